// A WHEP client (plain ES module): receive one session's generated video over WebRTC.
// POST an SDP offer (application/sdp) to /whep/{session}, get 201 + the answer + a Location that
// a DELETE ends. The server (aiortc) does not trickle ICE, so the offer goes with every candidate.

const GATHER_TIMEOUT_MS = 8000; // an unreachable STUN/TURN server must not hold the page forever

export function iceGatheringComplete(pc, timeoutMs = GATHER_TIMEOUT_MS) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      pc.removeEventListener('icegatheringstatechange', check);
      clearTimeout(timer);
      resolve();
    };
    const check = () => { if (pc.iceGatheringState === 'complete') done(); };
    const timer = setTimeout(done, timeoutMs); // send what was gathered so far
    pc.addEventListener('icegatheringstatechange', check);
  });
}

export class WhepError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export class WhepViewer {
  // url: the WHEP endpoint (/whep/{session}); onTrack(stream); onState(connectionState)
  constructor(url, { iceServers = [], token = null, onTrack = () => {}, onState = () => {} } = {}) {
    this.url = new URL(url, location.href);
    this.iceServers = iceServers;
    this.token = token;
    this.onTrack = onTrack;
    this.onState = onState;
    this.pc = null;
    this.resource = null;
  }

  async start() {
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this.pc = pc;
    pc.addTransceiver('video', { direction: 'recvonly' });
    pc.ontrack = (event) => this.onTrack(event.streams[0] ?? new MediaStream([event.track]));
    pc.onconnectionstatechange = () => this.onState(pc.connectionState);

    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc);
    const headers = { 'Content-Type': 'application/sdp' };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    const response = await fetch(this.url, { method: 'POST', headers, body: pc.localDescription.sdp });
    if (response.status !== 201) {
      let message = `HTTP ${response.status}`;
      try { message = (await response.json()).error ?? message; } catch { /* not JSON */ }
      throw new WhepError(message, response.status);
    }
    const where = response.headers.get('Location');
    this.resource = where ? new URL(where, this.url) : null;
    await pc.setRemoteDescription({ type: 'answer', sdp: await response.text() });
  }

  async stop() {
    const resource = this.resource;
    this.resource = null;
    this.pc?.close();
    this.pc = null;
    if (resource) {
      // keepalive: the DELETE still goes out when the page is being closed
      const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
      await fetch(resource, { method: 'DELETE', keepalive: true, headers }).catch(() => {});
    }
  }
}
