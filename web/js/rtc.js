// One streaming session: camera up, generated video down, controls on the `control` channel.

import { deleteSession, postOffer } from './api.js';
import { iceGatheringComplete } from './whep.js';

export class StreamSession {
  constructor({ onOutput, onMessage, onState }) {
    this.onOutput = onOutput;
    this.onMessage = onMessage;
    this.onState = onState;
    this.pc = null;
    this.channel = null;
    this.camera = null;
    this.sessionId = null;
  }

  async start({ camera, prompt, params, iceServers = [] }) {
    this.camera = camera;
    const pc = new RTCPeerConnection({ iceServers });
    this.pc = pc;
    this.channel = pc.createDataChannel('control');
    this.channel.onmessage = (event) => {
      try { this.onMessage(JSON.parse(event.data)); } catch (err) { console.warn('bad message', err); }
    };
    for (const track of camera.getVideoTracks()) pc.addTrack(track, camera);
    pc.ontrack = (event) => this.onOutput(event.streams[0] ?? new MediaStream([event.track]));
    pc.onconnectionstatechange = () => this.onState(pc.connectionState);

    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc); // the server (aiortc) does not trickle ICE
    const answer = await postOffer({ sdp: pc.localDescription.sdp, type: 'offer', prompt, params });
    this.sessionId = answer.session_id;
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    return this.sessionId;
  }

  send(update) {
    if (this.channel?.readyState !== 'open') return false;
    this.channel.send(JSON.stringify(update));
    return true;
  }

  // Camera off and connection closed at once; then the server is told (its answer can take seconds
  // while it stops the session's engine stream, and the camera must not stay live meanwhile).
  async stop() {
    const id = this.sessionId;
    this.sessionId = null;
    this.camera?.getTracks().forEach((t) => t.stop());
    this.camera = null;
    this.pc?.close();
    this.pc = null;
    if (id) await deleteSession(id).catch(() => {});
  }
}
