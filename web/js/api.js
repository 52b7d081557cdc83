// HTTP calls to the server. Errors come back as JSON {error, details?}.
// With a token configured (info.token_required) every call but /api/info carries it as a Bearer
// header; the page keeps it in localStorage (never in a URL, a cookie or the server's logs).

const TOKEN_KEY = 'streamgen-token';

export function getToken() {
  try { return localStorage.getItem(TOKEN_KEY) ?? ''; } catch { return ''; }
}

export function setToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token); else localStorage.removeItem(TOKEN_KEY);
  } catch { /* storage disabled: the token lasts as long as the page */ }
  memoryToken = token;
}

let memoryToken = getToken();

export function currentToken() {
  return memoryToken || null;
}

export function authHeaders(headers = {}) {
  return memoryToken ? { ...headers, Authorization: `Bearer ${memoryToken}` } : headers;
}

async function jsonOrThrow(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  if (!response.ok) {
    const message = body?.error ?? `HTTP ${response.status}`;
    const details = body?.details?.map((d) => `${d.loc}: ${d.msg}`).join('; ');
    const error = new Error(details ? `${message} (${details})` : message);
    error.status = response.status; // 401: the server wants its token
    throw error;
  }
  return body;
}

export async function fetchInfo() {
  return jsonOrThrow(await fetch('/api/info', { cache: 'no-store' }));
}

// The STUN/TURN servers for one peer connection. TURN credentials are handed to authenticated
// callers only (short-lived ones with --turn-secret); /api/info lists just the servers that need none.
export async function fetchIceServers() {
  const body = await jsonOrThrow(await fetch('/api/ice-servers', { cache: 'no-store', headers: authHeaders() }));
  return body.ice_servers ?? [];
}

export async function postOffer(offer) {
  return jsonOrThrow(await fetch('/api/offer', {
    method: 'POST',
    headers: authHeaders({ 'Content-Type': 'application/json' }),
    body: JSON.stringify(offer),
  }));
}

export async function deleteSession(sessionId) {
  await fetch(`/api/sessions/${encodeURIComponent(sessionId)}`, { method: 'DELETE', headers: authHeaders() });
}

export async function listSessions() {
  return jsonOrThrow(await fetch('/api/sessions', { cache: 'no-store', headers: authHeaders() }));
}

export async function fetchSession(sessionId) {
  return jsonOrThrow(await fetch(`/api/sessions/${encodeURIComponent(sessionId)}`, { cache: 'no-store', headers: authHeaders() }));
}

// Live controls of any session (e.g. one OBS publishes over WHIP) through the REST API.
export async function patchSession(sessionId, update) {
  return jsonOrThrow(await fetch(`/api/sessions/${encodeURIComponent(sessionId)}`, {
    method: 'PATCH',
    headers: authHeaders({ 'Content-Type': 'application/json' }),
    body: JSON.stringify(update),
  }));
}
