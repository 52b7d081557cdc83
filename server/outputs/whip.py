"""WHIP ingest (RFC 9725, what OBS 30+ publishes with) and WHEP egress (viewers of a session).

WHIP: `POST /whip` (application/sdp, `Authorization: Bearer TOKEN`) -> 201, `Location:
/whip/{session}`, ETag, the SDP answer; `DELETE` on the Location ends the session. The session's
prompt and controls come from the query string of the WHIP URL (`/whip?prompt=...&steps=2`) and
then from the REST API or the page, like any session. Trickle ICE and ICE restarts (PATCH) are not
supported (aiortc gathers all candidates up front, as OBS does): PATCH answers 405.

WHEP: `POST /whep/{session}` (application/sdp) -> 201 with an answer that sends the session's
output; `DELETE` on the Location ends that viewer. `latest` names the newest live session.
"""

from __future__ import annotations

import logging
from typing import Optional

from aiohttp import web
from multidict import CIMultiDict
from pydantic import ValidationError

from interface.controls import MAX_PROMPT_CHARS, StreamParams
from server.ops.auth import authorize, is_authenticated
from server.errors import ApiError, validation_details
from server.http import preflight
from server.media.ice import link_headers, public_servers
from server.media.session import Session
from server.media.signaling import accept_viewer, open_session
from server.state import STATE, AppState

log = logging.getLogger(__name__)

SDP = "application/sdp"
RESOURCE_METHODS = "DELETE, OPTIONS"
# A page may send PATCH (trickle ICE): the preflight lets it through so that the page sees our
# 405 and its reason rather than an opaque CORS failure.
PREFLIGHT_RESOURCE_METHODS = "DELETE, PATCH, OPTIONS"


async def read_sdp(request: web.Request) -> str:
    """The SDP offer of a WHIP/WHEP POST: 415 for another media type, 400 for what is not SDP."""
    if request.content_type != SDP:
        raise ApiError(415, f"the offer must be sent as Content-Type: {SDP}", headers={"Accept-Post": SDP})
    limit = request.app[STATE].config.max_sdp_bytes
    body = await request.read()
    if len(body) > limit:
        raise ApiError(413, f"the SDP offer is larger than {limit} bytes")
    try:
        sdp = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the SDP offer is not UTF-8 text") from None
    if not sdp.lstrip().startswith("v=0"):
        raise ApiError(400, "the body is not an SDP offer (it must start with v=0)")
    return sdp


def session_options(request: web.Request, default_prompt: str,
                    max_prompt_chars: int = MAX_PROMPT_CHARS) -> tuple[str, Optional[StreamParams]]:
    """Prompt and parameters from the WHIP URL's query (OBS has a URL field and a token, no body)."""
    query = dict(request.query)
    prompt = query.pop("prompt", default_prompt)
    if len(prompt) > max_prompt_chars:
        raise ApiError(422, f"the prompt is longer than {max_prompt_chars} characters")
    if not query:
        return prompt, None
    try:
        return prompt, StreamParams.model_validate(query)
    except ValidationError as exc:
        raise ApiError(422, "invalid session parameters in the WHIP URL", validation_details(exc)) from None


def sdp_created(request: web.Request, sdp: str, location: str, etag: str) -> web.Response:
    """201 with the answer, and the ICE servers as Link headers: TURN credentials only to a
    caller that proved it may have them (WHEP can be open with --token-scope publish)."""
    config = request.app[STATE].config
    headers = CIMultiDict({"Location": location, "ETag": etag, "Content-Type": SDP})
    servers = config.ice_for_peer()
    if not is_authenticated(config.token, request.headers.get("Authorization")):
        servers = public_servers(servers)
    for link in link_headers(servers):
        headers.add("Link", link)
    return web.Response(status=201, text=sdp, headers=headers)


# -- WHIP ------------------------------------------------------------------------------------------------


async def whip_publish(request: web.Request) -> web.Response:
    state = request.app[STATE]
    authorize(state.config.token, request.headers.get("Authorization"), request.remote)
    sdp = await read_sdp(request)
    prompt, params = session_options(request, state.config.default_prompt, state.config.max_prompt_chars)
    state.check_capacity()
    state.opening += 1  # offers being answered count too, or concurrent ones could overfill
    try:
        session, answer = await open_session(state.context, sdp, prompt, params, "whip")
    finally:
        state.opening -= 1
    state.add_session(session)
    return sdp_created(request, answer.sdp, f"/whip/{session.id}", session.etag)


def _whip_session(state: AppState, session_id: str) -> Session:
    session = state.sessions.get(session_id)
    if session is None or session.kind != "whip":
        raise ApiError(404, f"no WHIP session {session_id!r}")
    return session


async def whip_end(request: web.Request) -> web.Response:
    state = request.app[STATE]
    authorize(state.config.token, request.headers.get("Authorization"), request.remote)
    session = _whip_session(state, request.match_info["session_id"])
    await session.close("ended by the WHIP client")
    return web.Response(status=200)


async def whip_patch(request: web.Request) -> web.Response:
    raise ApiError(
        405, "trickle ICE and ICE restarts are not supported: publish again", headers={"Allow": RESOURCE_METHODS}
    )


async def whip_options(request: web.Request) -> web.Response:
    return preflight("POST, OPTIONS", accept_post=True)


async def resource_options(request: web.Request) -> web.Response:
    response = preflight(RESOURCE_METHODS)
    response.headers["Access-Control-Allow-Methods"] = PREFLIGHT_RESOURCE_METHODS
    return response


# -- WHEP ------------------------------------------------------------------------------------------------


async def whep_watch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    session = state.session(request.match_info["session_id"])
    sdp = await read_sdp(request)
    viewer, answer = await accept_viewer(state.context, session, sdp)
    return sdp_created(request, answer.sdp, f"/whep/{session.id}/{viewer.id}", viewer.etag)


async def whep_end(request: web.Request) -> web.Response:
    state = request.app[STATE]
    session = state.sessions.get(request.match_info["session_id"])
    if session is None or not await session.egress.remove_viewer(request.match_info["viewer_id"]):
        raise ApiError(404, "no such viewer")
    return web.Response(status=200)


async def whep_options(request: web.Request) -> web.Response:
    return preflight("POST, OPTIONS", accept_post=True)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/whip", whip_publish)
    r.add_route("OPTIONS", "/whip", whip_options)
    r.add_delete("/whip/{session_id}", whip_end)
    r.add_patch("/whip/{session_id}", whip_patch)
    r.add_route("OPTIONS", "/whip/{session_id}", resource_options)
    r.add_post("/whep/{session_id}", whep_watch)
    r.add_route("OPTIONS", "/whep/{session_id}", whep_options)
    r.add_delete("/whep/{session_id}/{viewer_id}", whep_end)
    r.add_patch("/whep/{session_id}/{viewer_id}", whip_patch)
    r.add_route("OPTIONS", "/whep/{session_id}/{viewer_id}", resource_options)
