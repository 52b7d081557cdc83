// HTTP calls to the server. Errors come back as JSON {error, details?}.

async function jsonOrThrow(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  if (!response.ok) {
    const message = body?.error ?? `HTTP ${response.status}`;
    const details = body?.details?.map((d) => `${d.loc}: ${d.msg}`).join('; ');
    throw new Error(details ? `${message} (${details})` : message);
  }
  return body;
}

export async function fetchInfo() {
  return jsonOrThrow(await fetch('/api/info', { cache: 'no-store' }));
}

export async function postOffer(offer) {
  return jsonOrThrow(await fetch('/api/offer', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(offer),
  }));
}

export async function deleteSession(sessionId) {
  await fetch(`/api/sessions/${encodeURIComponent(sessionId)}`, { method: 'DELETE' });
}

export async function listSessions() {
  return jsonOrThrow(await fetch('/api/sessions', { cache: 'no-store' }));
}

export async function fetchSession(sessionId) {
  return jsonOrThrow(await fetch(`/api/sessions/${encodeURIComponent(sessionId)}`, { cache: 'no-store' }));
}

// Live controls of any session (e.g. one OBS publishes over WHIP) through the REST API.
export async function patchSession(sessionId, update) {
  return jsonOrThrow(await fetch(`/api/sessions/${encodeURIComponent(sessionId)}`, {
    method: 'PATCH',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(update),
  }));
}
