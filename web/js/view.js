// /view/{session}: play one session's output full-window over WHEP, and keep trying. OBS restarts
// its WHIP stream as a new session, so with /view/latest the Browser Source follows it.
// Query options: ?fit=cover (fill, cropping) · ?background=transparent · ?status=0 (no status line)

// With a server token: the page's stored token (localStorage), or #token=... in the URL (an OBS
// Browser Source has no other way to get it; a fragment never reaches the server or its logs).

import { authHeaders, fetchIceServers, setToken } from './api.js';
import { WhepViewer } from './whep.js';

const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get('token')) setToken(fragment.get('token'));

const RETRY_MS = 2000; // the first retry; each failure in a row doubles it, up to MAX_RETRY_MS
const MAX_RETRY_MS = 30000;
const CHECK_MS = 2000; // how often the page asks whether its session still exists
const params = new URLSearchParams(location.search);
const video = document.getElementById('output');
const status = document.getElementById('status');
const sessionId = decodeURIComponent(location.pathname.split('/').filter(Boolean).pop() ?? 'latest');
let viewer = null;
let retryTimer = null;
let watching = null; // the session id the server resolved (for /view/latest)
let failures = 0; // connection attempts failed in a row

if (params.get('fit') === 'cover') video.classList.add('cover');
if (params.get('background') === 'transparent') {
  document.documentElement.classList.add('transparent');
  document.body.classList.add('transparent');
}
const showStatus = params.get('status') !== '0';

function say(text) {
  status.textContent = text;
  status.hidden = !showStatus || text === '';
}

async function iceServers() {
  try {
    return await fetchIceServers();
  } catch {
    try { // no token yet: the servers that need no credentials
      const response = await fetch('/api/info', { cache: 'no-store' });
      return (await response.json()).ice_servers ?? [];
    } catch {
      return [];
    }
  }
}

// Waiting for a session is normal (OBS not yet publishing) and polls at RETRY_MS; other failures
// (a refused token above all) back off.
function retry(reason, backoff = false) {
  const delay = backoff ? Math.min(MAX_RETRY_MS, RETRY_MS * 2 ** failures) : RETRY_MS;
  failures = backoff ? failures + 1 : 0;
  say(`${reason} — retrying in ${Math.round(delay / 1000)} s…`);
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, delay);
}

function failed(err) {
  if (err.status === 401 || err.status === 403) {
    // Retrying cannot help until the URL carries the token: say how, then try now and then.
    const hint = authHeaders().Authorization
      ? 'the token in this page\'s URL (#token=…) was refused'
      : 'this server needs its access token: add #token=YOUR_TOKEN to this page\'s URL';
    retry(hint, true);
  } else if (err.status === 404) {
    retry('no such session yet');
  } else {
    retry(err.message, true);
  }
}

async function connect() {
  clearTimeout(retryTimer);
  const old = viewer;
  viewer = null;
  if (old) await old.stop();
  const current = new WhepViewer(`/whep/${encodeURIComponent(sessionId)}`, {
    iceServers: await iceServers(),
    token: authHeaders().Authorization?.slice('Bearer '.length) ?? null,
    onTrack: (stream) => { video.srcObject = stream; },
    onState: (state) => {
      if (viewer !== current) return;
      if (state === 'connected') { failures = 0; say(''); }
      else if (state === 'failed' || state === 'closed') retry(`connection ${state}`);
    },
  });
  viewer = current;
  if (failures === 0) say(sessionId === 'latest' ? 'waiting for a session…' : `connecting to ${sessionId.slice(0, 8)}…`);
  try {
    await current.start();
    watching = current.resource?.pathname.split('/')[2] ?? null; // /whep/{session}/{viewer}
  } catch (err) {
    if (viewer === current) failed(err);
  }
}

// A browser notices a peer that went away only after ICE times out (tens of seconds); the server
// knows at once. So ask it: when the session is gone, start over (under /view/latest, with the
// next session, e.g. OBS publishing again).
async function checkSession() {
  if (watching && viewer) {
    try {
      const response = await fetch(`/api/sessions/${watching}`, { cache: 'no-store', headers: authHeaders() });
      if (response.status === 404) {
        watching = null;
        retry('the session ended');
      }
    } catch { /* the server is unreachable: the connection state will say so */ }
  }
  setTimeout(checkSession, CHECK_MS);
}

video.addEventListener('playing', () => say(''));
window.addEventListener('pagehide', () => viewer?.stop());
connect();
checkSession();
