"""SDP offer -> answer: a new peer connection bound to a new session (DESIGN §5), for the page
(`/api/offer`, JSON) and for WHIP publishers (`/whip`, application/sdp); and viewer connections
to a session's output (WHEP)."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import Optional

from aiortc import RTCPeerConnection, RTCSessionDescription

from interface.controls import StreamParams
from server.config import ServerConfig
from server.egress import SessionEgress, Viewer
from server.engine_client import EngineUnavailable
from server.errors import ApiError
from server.ice import peer_connection
from server.schemas import OfferRequest, SessionKind
from server.session import Session, SessionContext
from server.tracks import drain

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
    pc = peer_connection(ctx.config.ice_servers)
    session = Session(uuid.uuid4().hex, ctx, pc, prompt, params, kind=kind)
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
    pc = peer_connection(ctx.config.ice_servers)
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


async def _set_offer(pc: RTCPeerConnection, sdp: str) -> None:
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as exc:  # aiortc raises assorted errors on malformed SDP
        codecs = offered_video_codecs(sdp)
        if codecs and not {"H264", "VP8"} & set(codecs):
            raise ApiError(
                400, f"no video codec in common: the offer has {', '.join(codecs)}; send {VIDEO_CODECS}"
            ) from None
        raise ApiError(400, f"invalid SDP offer: {type(exc).__name__}: {exc}") from None


async def _answer(pc: RTCPeerConnection) -> None:
    try:
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except Exception as exc:  # e.g. no codec in common
        raise ApiError(
            400, f"cannot answer this offer ({VIDEO_CODECS} video expected): {type(exc).__name__}: {exc}"
        ) from None
