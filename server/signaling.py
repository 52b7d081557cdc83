"""SDP offer -> answer: a new peer connection bound to a new session (DESIGN §5)."""

from __future__ import annotations

import asyncio
import logging
import uuid

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from server.engine_client import EngineUnavailable
from server.errors import ApiError
from server.schemas import OfferRequest
from server.session import Session, SessionContext

log = logging.getLogger(__name__)


def _peer_connection(ice_servers: list[str]) -> RTCPeerConnection:
    if not ice_servers:
        return RTCPeerConnection()
    return RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in ice_servers]))


async def accept_offer(ctx: SessionContext, offer: OfferRequest) -> tuple[Session, RTCSessionDescription]:
    """Answer an offer. Raises ApiError (4xx/5xx) and leaves nothing open when it fails."""
    if ctx.engine.state != "ready":
        raise ApiError(503, f"the engine is {ctx.engine.state}" + (f": {ctx.engine.error}" if ctx.engine.error else ""))
    pc = _peer_connection(ctx.config.ice_servers)
    prompt = ctx.config.default_prompt if offer.prompt is None else offer.prompt
    session = Session(uuid.uuid4().hex, ctx, pc, prompt, offer.params)
    try:
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type=offer.type))
        except Exception as exc:  # aiortc raises assorted errors on malformed SDP
            raise ApiError(400, f"invalid SDP offer: {type(exc).__name__}: {exc}") from None
        if not session.has_video:
            raise ApiError(400, "the offer has no video track to restyle")
        try:
            await session.open_engine()
        except EngineUnavailable as exc:
            raise ApiError(503, str(exc)) from None
        except asyncio.TimeoutError:
            raise ApiError(503, "the engine did not open the session in time (busy?)") from None
        try:
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except Exception as exc:  # e.g. no codec in common
            raise ApiError(400, f"cannot answer this offer: {type(exc).__name__}: {exc}") from None
    except BaseException:
        await session.close("offer rejected")
        raise
    log.info("session %s: answered (prompt %r)", session.id, session.prompt[:80])
    return session, pc.localDescription
