"""SDP offer -> answer: a new peer connection bound to a new session (docs/ARCHITECTURE.md §8), for the page
(`/api/offer`, JSON) and for WHIP publishers (`/whip`, application/sdp); and viewer connections
to a session's output (WHEP)."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import Optional

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc import sdp as aiortc_sdp

from interface.controls import StreamParams
from server.config import ServerConfig
from server.outputs.egress import SessionEgress, Viewer
from server.media.engine_client import EngineUnavailable
from server.errors import ApiError
from server.media.ice import peer_connection
from server.schemas import OfferRequest, SessionKind
from server.media.session import Session, SessionContext
from server.media.tracks import drain

log = logging.getLogger(__name__)

VIDEO_CODECS = "H.264 or VP8"


async def accept_offer(ctx: SessionContext, offer: OfferRequest) -> tuple[Session, RTCSessionDescription]:
    """Answer the page's offer (its camera and, on the same connection, the generated video)."""
    prompt = ctx.config.default_prompt if offer.prompt is None else offer.prompt
    return await open_session(ctx, offer.sdp, prompt, offer.params, "browser")


async def open_session(
    ctx: SessionContext, sdp: str, prompt: str, params: Optional[StreamParams], kind: SessionKind
) -> tuple[Session, RTCSessionDescription]:
    """A new session from an SDP offer. Raises ApiError (4xx/5xx) and leaves nothing open when it fails."""
    if ctx.engine.state != "ready":
        raise ApiError(503, f"the engine is {ctx.engine.state}" + (f": {ctx.engine.error}" if ctx.engine.error else ""))
    session_id = uuid.uuid4().hex
    pc = peer_connection(ctx.config.ice_for_peer(session_id))
    session = Session(session_id, ctx, pc, prompt, params, kind=kind)
    try:
        await _set_offer(pc, sdp)
        if not session.has_video:
            raise ApiError(400, "the offer has no video track to restyle")
        try:
            await session.open_engine()
        except EngineUnavailable as exc:
            raise ApiError(503, str(exc)) from None
        except asyncio.TimeoutError:
            raise ApiError(503, "the engine did not open the session in time (busy?)") from None
        await _answer(pc)
        session.answered()
    except BaseException:
        await session.close("offer rejected")
        raise
    log.info("session %s (%s): answered (prompt %r)", session.id, kind, session.prompt[:80])
    return session, pc.localDescription


async def accept_viewer(ctx: SessionContext, session: Session, sdp: str) -> tuple[Viewer, RTCSessionDescription]:
    """A WHEP viewer of `session`'s output: one more relay subscriber, never another engine stream.
    It stays pending until its connection is up, and is dropped if that takes longer than
    `viewer_connect_timeout_s`."""
    egress = session.egress
    await _make_room_for_viewer(ctx.config, egress, session.id)
    pc = peer_connection(ctx.config.ice_for_peer())
    track = egress.sender_track()
    viewer = Viewer(uuid.uuid4().hex, pc, track, f'"{uuid.uuid4().hex}"')
    # A viewer that also sends (sendrecv) is answered, and what it sends is read and dropped.
    pc.on("track", lambda t: asyncio.ensure_future(drain(t, lambda frame: None)))

    async def on_state() -> None:  # registered first: ICE may complete before the answer is sent
        if pc.connectionState == "connected":
            egress.viewer_connected(viewer)
            log.info("session %s: viewer %s connected (%d watching)", session.id, viewer.id, egress.connected_viewers())
        elif pc.connectionState in ("failed", "closed"):
            await egress.remove_viewer(viewer.id, f"left (connection {pc.connectionState})")

    pc.on("connectionstatechange", on_state)
    egress.joining += 1
    try:
        await _set_offer(pc, sdp)
        if not any(t.kind == "video" for t in pc.getTransceivers()):
            raise ApiError(400, "the offer has no video m-line to receive the output on")
        pc.addTrack(track)  # on the offer's video transceiver: the answer says sendonly
        await _answer(pc)
        if session.closed:
            raise ApiError(404, f"session {session.id} ended")
    except BaseException:
        track.stop()
        await pc.close()
        raise
    finally:
        egress.joining -= 1
    egress.add_viewer(viewer, ctx.config.viewer_connect_timeout_s)
    log.info("session %s: viewer %s answered (%d watching, %d connecting)", session.id, viewer.id,
             egress.connected_viewers(), len(egress.pending_viewers()))
    return viewer, pc.localDescription


async def _make_room_for_viewer(config: ServerConfig, egress: SessionEgress, session_id: str) -> None:
    """Admit one more viewer, or raise 503. Connected viewers are capped by `max_viewers`; viewers
    still connecting (answered or being answered) by `max_pending_viewers`, and both together by
    `max_viewers`. When only pending viewers stand in the way, the oldest is dropped for the new
    one: offers whose ICE never completes cannot lock out viewers whose ICE does."""
    while True:
        connected, pending = egress.connected_viewers(), egress.pending_viewers()
        waiting = len(pending) + egress.joining
        if connected >= config.max_viewers:
            raise ApiError(503, f"session {session_id} has its maximum of {config.max_viewers} viewers",
                           headers={"Retry-After": "10"})
        if waiting < config.max_pending_viewers and connected + waiting < config.max_viewers:
            return  # the caller counts itself in `joining` before its next await
        if not pending:  # every pending slot is an answer in progress
            raise ApiError(503, f"session {session_id} is answering {egress.joining} viewers already",
                           headers={"Retry-After": "1"})
        await egress.remove_viewer(pending[0].id, "dropped: not connected, and a newer viewer needed the slot")


def offered_video_codecs(sdp: str) -> list[str]:
    """Codec names of the offer's video m-lines (for an error that says what was offered)."""
    names: list[str] = []
    for section in re.split(r"(?m)^m=", sdp)[1:]:
        if section.startswith("video"):
            names += [n.upper() for n in re.findall(r"(?m)^a=rtpmap:\d+ ([\w.-]+)/", section)]
    return [n for n in dict.fromkeys(names) if n not in ("RTX", "RED", "ULPFEC", "FLEXFEC-03")]


def offers_h264_mode_1(sdp: str) -> bool:
    """Whether some H.264 payload of a video m-line has `packetization-mode=1`, the only mode aiortc
    takes (an H.264 payload without an fmtp line saying so is mode 0)."""
    for section in re.split(r"(?m)^m=", sdp)[1:]:
        if section.startswith("video"):
            for pt in re.findall(r"(?mi)^a=rtpmap:(\d+) H264/", section):
                if re.search(rf"(?m)^a=fmtp:{pt} .*packetization-mode=1", section):
                    return True
    return False


async def _set_offer(pc: RTCPeerConnection, sdp: str) -> None:
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as exc:  # aiortc raises assorted errors on malformed SDP
        codecs = offered_video_codecs(sdp)
        if codecs and not {"H264", "VP8"} & set(codecs):
            raise ApiError(
                400, f"no video codec in common: the offer has {', '.join(codecs)}; send {VIDEO_CODECS}"
            ) from None
        if "H264" in codecs and "VP8" not in codecs and not offers_h264_mode_1(sdp):
            raise ApiError(
                400, "H.264 is offered without packetization-mode=1 (a=fmtp), the mode WebRTC needs: send it "
                "(GStreamer: in the caps after rtph264pay) or VP8"
            ) from None
        raise ApiError(400, f"invalid SDP offer: {type(exc).__name__}: {exc}") from None


def as_dtls_server(offer_sdp: str, answer_sdp: str) -> str:
    """The answer with `a=setup:passive` (we are the DTLS server) wherever the offer left the role to
    us (`actpass`); an offer that chose a role keeps the opposite one.

    Why: aiortc answers `actpass` with `active`, so it would be the DTLS client, and as a client it
    offers only ECDHE-ECDSA cipher suites. A peer with an RSA certificate, such as GStreamer's
    webrtcbin (1.22), then fails the handshake with "no shared cipher". As the server, aiortc
    presents its ECDSA certificate, which every client's suites cover (browsers, OBS, webrtcbin).
    WHIP/WHEP servers commonly answer `passive` too; see docs/OBS.md. aiortc applies the role of an
    answer given to setLocalDescription, so no private API is touched.
    """
    offer = aiortc_sdp.SessionDescription.parse(offer_sdp)
    answer = aiortc_sdp.SessionDescription.parse(answer_sdp)
    changed = False
    for offered, answered in zip(offer.media, answer.media):
        if offered.dtls is not None and offered.dtls.role == "auto" and answered.dtls is not None:
            changed = changed or answered.dtls.role != "server"
            answered.dtls.role = "server"
    return str(answer) if changed else answer_sdp


async def _answer(pc: RTCPeerConnection) -> None:
    try:
        answer = await pc.createAnswer()
        sdp = as_dtls_server(pc.remoteDescription.sdp, answer.sdp)
        await pc.setLocalDescription(RTCSessionDescription(sdp=sdp, type=answer.type))
    except Exception as exc:  # e.g. no codec in common
        raise ApiError(
            400, f"cannot answer this offer ({VIDEO_CODECS} video expected): {type(exc).__name__}: {exc}"
        ) from None
