// The page: camera picker, start/stop, live controls, stats panel and latency plot, and the list of
// the server's sessions (any of which, e.g. one OBS publishes over WHIP, the controls can drive).

import { authHeaders, currentToken, fetchIceServers, fetchInfo, fetchSession, getToken, listSessions, patchSession, setToken } from './api.js';
import { LatencyPlot } from './plot.js';
import { StreamSession } from './rtc.js';
import { WhepViewer } from './whep.js';

const $ = (id) => document.getElementById(id);
const ui = {
  badge: $('engine-badge'), banner: $('banner'), camera: $('camera'), start: $('start'), stop: $('stop'),
  status: $('status'), input: $('input-video'), output: $('output-video'), prompt: $('prompt'),
  transition: $('transition'), applyPrompt: $('apply-prompt'), strength: $('strength'),
  strengthValue: $('strength-value'), steps: $('steps'), stepsValue: $('steps-value'), seed: $('seed'),
  applySeed: $('apply-seed'), motion: $('motion'), reset: $('reset'), feedback: $('control-feedback'),
  target: $('control-target'), sessions: $('sessions'), whipUrl: $('whip-url'), whipToken: $('whip-token-hint'),
  tokenRow: $('token-row'), token: $('token'),
};
const plot = new LatencyPlot($('latency-plot'));
const touched = new Set(); // params the user changed before starting: sent with the offer
let session = null;
let engineReady = false;
let iceServers = [];
let controlled = null; // a session driven through the REST API (not this page's own); null: our own
let pollTimer = null;
let watcher = null; // WHEP viewer of the controlled session's output
let ownOutput = null; // this page's session's generated stream
let engineSteps = null; // the model's default steps (from /api/info)
const DEFAULTS = { strength: ui.strength.value, transition: ui.transition.value }; // the page's own
const SESSIONS_EVERY_MS = 2000;
const LIGHT = { taehv: 'TAEHV', lightvae: 'LightVAE' }; // light encoders/decoders, by /api/info name
const STATS_EVERY_MS = 1000;

function setStatus(text, isError = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle('error', isError);
}

function setFeedback(text, isError = false) {
  ui.feedback.textContent = text;
  ui.feedback.classList.toggle('error', isError);
}

const fmt = (v, digits = 0, unit = '') => (v === null || v === undefined ? '—' : `${Number(v).toFixed(digits)}${unit}`);

function showStats(s) {
  $('stat-fps-in').textContent = fmt(s.fps_in, 1);
  $('stat-fps-out').textContent = fmt(s.fps_out, 1);
  $('stat-ttff').textContent = fmt(s.ttff_ms, 0, ' ms');
  $('stat-p50').textContent = fmt(s.latency_ms.p50, 0, ' ms');
  $('stat-p95').textContent = fmt(s.latency_ms.p95, 0, ' ms');
  $('stat-p99').textContent = fmt(s.latency_ms.p99, 0, ' ms');
  $('stat-jitter').textContent = fmt(s.jitter_ms.p95, 0, ' ms');
  $('stat-miss').textContent = fmt(s.miss_rate * 100, 1, ' %');
  $('stat-drops').textContent = `${s.dropped.input ?? 0} / ${s.dropped.late ?? 0} / ${s.dropped.engine ?? 0}`;
  const e = s.engine;
  $('stat-engine').textContent = e.dit_ms === undefined
    ? '—' : `${fmt(e.vae_encode_ms)} / ${fmt(e.dit_ms)} / ${fmt(e.vae_decode_ms)} ms`;
  $('stat-noise').textContent = fmt(e.noise_strength, 2);
  $('stat-frames').textContent = `${s.frames_in} / ${s.frames_out}`;
  plot.add(s);
}

function onMessage(message) {
  if (message.type === 'stats') { if (!controlled) showStats(message); }
  else if (message.type === 'ack') setFeedback(`applied: ${Object.keys(message.applied).join(', ') || 'nothing'}`);
  else if (message.type === 'error') setFeedback(message.error, true);
}

async function showEngine() {
  try {
    const info = await fetchInfo();
    const e = info.engine;
    engineReady = info.engine_state === 'ready';
    iceServers = info.ice_servers ?? [];
    ui.tokenRow.hidden = !info.token_required;
    ui.whipToken.textContent = info.whip_token_required
      ? ', Bearer Token: the server\'s --token' : ' (no token set: OBS on this machine only)';
    ui.badge.className = `badge ${engineReady ? 'ready' : info.engine_state === 'failed' ? 'failed' : ''}`;
    ui.badge.textContent = e
      ? `${e.model} · ${e.width}×${e.height} · ${e.steps} step${e.steps > 1 ? 's' : ''} · ${e.device} ${e.dtype}`
        + (LIGHT[e.encoder] ? ` · light encoder (${LIGHT[e.encoder]})` : '')
        + (LIGHT[e.decoder] ? ` · light decoder (${LIGHT[e.decoder]})` : '')
      : `engine: ${info.engine_state}${info.engine_error ? ` — ${info.engine_error}` : ''}`;
    ui.banner.hidden = !info.notice;
    ui.banner.textContent = info.notice ?? '';
    if (!ui.prompt.value) ui.prompt.value = info.default_prompt;
    engineSteps = e?.steps ?? null;
    if (e && !touched.has('steps') && !controlled) { ui.steps.value = e.steps; ui.stepsValue.textContent = e.steps; }
    ui.start.disabled = !engineReady || session !== null;
    if (!engineReady && info.engine_state !== 'failed') setTimeout(showEngine, 2000);
  } catch (err) {
    ui.badge.textContent = 'server unreachable';
    setTimeout(showEngine, 3000);
  }
}

async function listCameras() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  const current = ui.camera.value;
  const cams = devices.filter((d) => d.kind === 'videoinput');
  ui.camera.replaceChildren(...cams.map((d, i) => new Option(d.label || `camera ${i + 1}`, d.deviceId)));
  if (!cams.length) ui.camera.append(new Option('default camera', ''));
  if (cams.some((d) => d.deviceId === current)) ui.camera.value = current;
}

function currentParams() {
  const params = { seed: Number(ui.seed.value) || 0, motion_control: ui.motion.checked,
    transition_chunks: Number(ui.transition.value) };
  if (touched.has('steps')) params.steps = Number(ui.steps.value);
  if (touched.has('strength')) params.noise_strength = Number(ui.strength.value);
  return params;
}

async function start() {
  ui.start.disabled = true;
  setStatus('opening camera…');
  try {
    const deviceId = ui.camera.value;
    const camera = await navigator.mediaDevices.getUserMedia({
      video: { ...(deviceId ? { deviceId: { exact: deviceId } } : {}), width: { ideal: 640 }, height: { ideal: 480 } },
      audio: false,
    });
    ui.input.srcObject = camera;
    await listCameras(); // labels are visible once permission is granted
    plot.reset();
    session = new StreamSession({
      onOutput: (stream) => { ownOutput = stream; if (!controlled) ui.output.srcObject = stream; },
      onMessage,
      onState: (state) => {
        setStatus(state === 'connected' ? 'streaming' : state, state === 'failed');
        if (state === 'failed' || state === 'closed') stop();
      },
    });
    setStatus('connecting…');
    const servers = await fetchIceServers().catch(() => iceServers); // without TURN if that fails
    const id = await session.start({ camera, prompt: ui.prompt.value, params: currentParams(), iceServers: servers });
    setStatus(`session ${id.slice(0, 8)} — waiting for the first frames…`);
    ui.stop.disabled = false;
  } catch (err) {
    setStatus(`could not start: ${err.message}`, true);
    await stop();
  }
}

async function stop() {
  const s = session;
  session = null;
  ownOutput = null;
  ui.stop.disabled = true;
  ui.input.srcObject = null;
  if (!controlled) ui.output.srcObject = null;
  const failed = ui.status.classList.contains('error');
  if (s) {
    if (!failed) setStatus('stopping…');
    await s.stop(); // the camera goes off first; then the server's DELETE
  }
  ui.start.disabled = !engineReady || session !== null;
  if (!failed && session === null) setStatus('idle');
}

function sendUpdate(update) {
  if (controlled) {
    patchSession(controlled, update).then(
      () => setFeedback(`applied: ${Object.keys(update).join(', ')}`),
      (err) => setFeedback(err.message, true),
    );
    return;
  }
  if (!session) { setFeedback('takes effect when you start'); return; }
  if (!session.send(update)) setFeedback('control channel not open yet', true);
}

ui.start.addEventListener('click', start);
ui.stop.addEventListener('click', stop);
ui.applyPrompt.addEventListener('click', () => sendUpdate({
  prompt: ui.prompt.value, transition_chunks: Number(ui.transition.value),
}));
ui.prompt.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); ui.applyPrompt.click(); }
});
ui.strength.addEventListener('input', () => { ui.strengthValue.textContent = Number(ui.strength.value).toFixed(2); });
ui.strength.addEventListener('change', () => { touched.add('strength'); sendUpdate({ noise_strength: Number(ui.strength.value) }); });
ui.steps.addEventListener('input', () => { ui.stepsValue.textContent = ui.steps.value; });
ui.steps.addEventListener('change', () => { touched.add('steps'); sendUpdate({ steps: Number(ui.steps.value) }); });
ui.applySeed.addEventListener('click', () => sendUpdate({ seed: Number(ui.seed.value) || 0 }));
ui.motion.addEventListener('change', () => sendUpdate({ motion_control: ui.motion.checked }));
ui.reset.addEventListener('click', () => sendUpdate({ reset: true }));
window.addEventListener('pagehide', () => {
  // Free the server's session now rather than when ICE times out.
  watcher?.stop();
  if (session?.sessionId) fetch(`/api/sessions/${session.sessionId}`, { method: 'DELETE', keepalive: true, headers: authHeaders() });
});

// -- other sessions ---------------------------------------------------------------------------------

// The controls show a controlled session's own settings (a WHIP session's come from its URL).
function showParams(params) {
  ui.steps.value = params.steps ?? engineSteps ?? ui.steps.value;
  ui.stepsValue.textContent = ui.steps.value;
  ui.strength.value = params.noise_strength ?? DEFAULTS.strength;
  ui.strengthValue.textContent = Number(ui.strength.value).toFixed(2);
  ui.seed.value = params.seed ?? 0;
  ui.motion.checked = params.motion_control ?? true;
  ui.transition.value = params.transition_chunks ?? DEFAULTS.transition;
}

async function pollControlled(first = false) {
  if (!controlled) return;
  const id = controlled;
  try {
    const info = await fetchSession(id);
    if (controlled !== id) return;
    if (first) { showParams(info.params ?? {}); ui.prompt.value = info.prompt; }
    showStats(info.stats);
  } catch (err) {
    if (controlled === id) { setFeedback(`session ${id.slice(0, 8)}: ${err.message}`, true); control(null); }
    return;
  }
  pollTimer = setTimeout(pollControlled, STATS_EVERY_MS);
}

// The output pane plays the controlled session's output over WHEP (as /view/{session} does).
function watch(id) {
  const old = watcher;
  watcher = null;
  old?.stop();
  if (!id) { ui.output.srcObject = ownOutput; return; }
  ui.output.srcObject = null;
  const viewer = new WhepViewer(`/whep/${encodeURIComponent(id)}`, {
    iceServers, token: currentToken(), onTrack: (stream) => { if (watcher === viewer) ui.output.srcObject = stream; },
  });
  watcher = viewer;
  fetchIceServers().catch(() => iceServers) // TURN credentials need the token
    .then((servers) => { viewer.iceServers = servers; return viewer.start(); })
    .catch((err) => { if (watcher === viewer) setFeedback(`output of ${id.slice(0, 8)}: ${err.message}`, true); });
}

function control(id, prompt = null) {
  const next = id && id !== session?.sessionId ? id : null;
  const changed = next !== controlled;
  controlled = next;
  clearTimeout(pollTimer);
  plot.reset();
  ui.target.textContent = controlled ? `session ${controlled.slice(0, 8)} (REST API)` : 'this page\'s session';
  if (changed) watch(controlled);
  if (controlled) {
    if (prompt !== null) ui.prompt.value = prompt;
    setFeedback('');
    pollControlled(true);
  }
}

function cell(text, className = '') {
  const td = document.createElement('td');
  td.textContent = text; // prompts are user text: never HTML
  if (className) td.className = className;
  return td;
}

function sessionRow(s) {
  const tr = document.createElement('tr');
  const mine = s.session_id === session?.sessionId;
  if (s.session_id === controlled || (mine && !controlled)) tr.className = 'controlled';
  tr.append(
    cell(s.session_id.slice(0, 8) + (mine ? ' (this page)' : '')),
    cell(s.kind === 'whip' ? 'WHIP' : 'browser'),
    cell(s.state),
    cell(s.prompt, 'prompt'),
    cell(String(s.viewers ?? 0)),
    cell(fmt(s.stats.fps_out, 1)),
  );
  const actions = document.createElement('td');
  const button = document.createElement('button');
  button.type = 'button';
  button.textContent = 'Control';
  button.addEventListener('click', () => control(mine ? null : s.session_id, s.prompt));
  const link = document.createElement('a');
  link.href = `/view/${s.session_id}`;
  link.target = '_blank';
  link.rel = 'noopener';
  link.textContent = 'View';
  actions.append(button, ' ', link);
  tr.append(actions);
  return tr;
}

function sessionsNote(text) {
  const tr = document.createElement('tr');
  tr.append(cell(text, 'muted'));
  tr.firstChild.colSpan = 7;
  ui.sessions.replaceChildren(tr);
}

let sessionsTimer = null;
let sessionsRun = 0; // a refresh started by a new token supersedes the one in flight
async function refreshSessions() {
  const run = ++sessionsRun;
  clearTimeout(sessionsTimer);
  try {
    const { sessions } = await listSessions();
    if (run !== sessionsRun) return;
    if (sessions.length) ui.sessions.replaceChildren(...sessions.map(sessionRow));
    else sessionsNote('none');
    if (controlled && !sessions.some((s) => s.session_id === controlled)) control(null);
  } catch (err) {
    if (run !== sessionsRun) return;
    if (err.status === 401 || err.status === 403) {
      sessionsNote(currentToken() ? `the access token was refused (${err.message})` : 'the server needs its access token: enter it above');
    } /* otherwise the badge says when the server is unreachable */
  }
  sessionsTimer = setTimeout(refreshSessions, SESSIONS_EVERY_MS);
}

// A new token: what failed for want of it is retried now, and its error leaves the screen.
ui.token.value = getToken();
ui.token.addEventListener('change', () => {
  setToken(ui.token.value.trim());
  if (ui.feedback.classList.contains('error')) setFeedback('');
  if (ui.status.classList.contains('error') && !session) setStatus('idle');
  refreshSessions();
  if (controlled) { const id = controlled; controlled = null; control(id); }
});
$('controls').addEventListener('submit', (e) => e.preventDefault());

ui.whipUrl.textContent = `${location.origin}/whip`;
plot.draw();
showEngine();
refreshSessions();
listCameras().catch(() => {});
