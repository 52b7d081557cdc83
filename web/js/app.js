// The page: camera picker, start/stop, live controls, stats panel and latency plot.

import { fetchInfo } from './api.js';
import { LatencyPlot } from './plot.js';
import { StreamSession } from './rtc.js';

const $ = (id) => document.getElementById(id);
const ui = {
  badge: $('engine-badge'), banner: $('banner'), camera: $('camera'), start: $('start'), stop: $('stop'),
  status: $('status'), input: $('input-video'), output: $('output-video'), prompt: $('prompt'),
  transition: $('transition'), applyPrompt: $('apply-prompt'), strength: $('strength'),
  strengthValue: $('strength-value'), steps: $('steps'), stepsValue: $('steps-value'), seed: $('seed'),
  applySeed: $('apply-seed'), motion: $('motion'), reset: $('reset'), feedback: $('control-feedback'),
};
const plot = new LatencyPlot($('latency-plot'));
const touched = new Set(); // params the user changed before starting: sent with the offer
let session = null;
let engineReady = false;

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
  if (message.type === 'stats') showStats(message);
  else if (message.type === 'ack') setFeedback(`applied: ${Object.keys(message.applied).join(', ') || 'nothing'}`);
  else if (message.type === 'error') setFeedback(message.error, true);
}

async function showEngine() {
  try {
    const info = await fetchInfo();
    const e = info.engine;
    engineReady = info.engine_state === 'ready';
    ui.badge.className = `badge ${engineReady ? 'ready' : info.engine_state === 'failed' ? 'failed' : ''}`;
    ui.badge.textContent = e
      ? `${e.model} · ${e.width}×${e.height} · ${e.steps} step${e.steps > 1 ? 's' : ''} · ${e.device} ${e.dtype}`
      : `engine: ${info.engine_state}${info.engine_error ? ` — ${info.engine_error}` : ''}`;
    ui.banner.hidden = !info.notice;
    ui.banner.textContent = info.notice ?? '';
    if (!ui.prompt.value) ui.prompt.value = info.default_prompt;
    if (e && !touched.has('steps')) { ui.steps.value = e.steps; ui.stepsValue.textContent = e.steps; }
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
      onOutput: (stream) => { ui.output.srcObject = stream; },
      onMessage,
      onState: (state) => {
        setStatus(state === 'connected' ? 'streaming' : state, state === 'failed');
        if (state === 'failed' || state === 'closed') stop();
      },
    });
    setStatus('connecting…');
    const id = await session.start({ camera, prompt: ui.prompt.value, params: currentParams() });
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
  ui.stop.disabled = true;
  ui.start.disabled = !engineReady;
  if (s) await s.stop();
  ui.input.srcObject = null;
  ui.output.srcObject = null;
  if (!ui.status.classList.contains('error')) setStatus('idle');
}

function sendUpdate(update) {
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
  if (session?.sessionId) fetch(`/api/sessions/${session.sessionId}`, { method: 'DELETE', keepalive: true });
});

plot.draw();
showEngine();
listCameras().catch(() => {});
