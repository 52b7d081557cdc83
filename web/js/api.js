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
