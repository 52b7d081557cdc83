"""REST API of a session's outputs: recordings, restreams and the virtual camera.

`POST /api/sessions/{id}/outputs` {kind: record|restream|virtual_camera, ...} -> 201 with the
output (and its id); `GET` lists them or one; `DELETE .../outputs/{oid}` stops one and answers
once it has finished (the file is complete). Starting and stopping outputs needs the same
authorization as WHIP (server/ops/auth.py): they write files and open outbound connections.
"""

from __future__ import annotations

import logging

from aiohttp import web

from server.ops.auth import authorize
from server.errors import ApiError
from server.http import json_response, read_json
from server.outputs.restream import EncoderSink, recording_path, redact_url, restream_target
from server.schemas import OutputList, OutputRequest, RecordRequest, RestreamRequest
from server.media.session import Session
from server.outputs.sinks import FrameSink
from server.state import STATE, AppState
from server.outputs.virtual_camera import VirtualCameraUnavailable

log = logging.getLogger(__name__)


def _session(request: web.Request) -> tuple[AppState, Session]:
    state = request.app[STATE]
    return state, state.session(request.match_info["session_id"])


async def list_outputs(request: web.Request) -> web.Response:
    _, session = _session(request)
    return json_response(OutputList(outputs=[o.info() for o in session.egress.outputs.values()]))


async def get_output(request: web.Request) -> web.Response:
    _, session = _session(request)
    sink = session.egress.outputs.get(request.match_info["output_id"])
    if sink is None:
        raise ApiError(404, f"no output {request.match_info['output_id']!r}")
    return json_response(sink.info())


async def create_output(request: web.Request) -> web.Response:
    state, session = _session(request)
    authorize(state.config.token, request.headers.get("Authorization"), request.remote)
    spec = (await read_json(request, OutputRequest)).root
    if session.egress.live_outputs() >= state.config.max_outputs:
        raise ApiError(409, f"session {session.id} already has {state.config.max_outputs} outputs running; stop one")
    bitrate = getattr(spec, "bitrate_kbps", None) or state.config.output_bitrate_kbps
    sink: FrameSink
    if isinstance(spec, RecordRequest):
        path = recording_path(state.config.recordings_dir, spec.path, session.id)
        try:  # claim the name now: two requests for one file must not both write it
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=False)
        except FileExistsError:
            raise ApiError(409, f"{spec.path} exists already; choose another name") from None
        except OSError as exc:
            raise ApiError(500, f"cannot create the recording file: {exc.strerror}") from None
        sink = EncoderSink(session.egress.new_output_id(), "record", str(path), "mp4", bitrate, str(path))
        session.egress.add_output(sink)
    elif isinstance(spec, RestreamRequest):
        url, container = restream_target(spec.url)
        sink = EncoderSink(session.egress.new_output_id(), "restream", url, container, bitrate, redact_url(url))
        session.egress.add_output(sink)
    else:
        if state.virtual_camera is None:
            raise ApiError(409, "the virtual camera is off: start the server with --virtual-camera")
        try:
            sink = await state.virtual_camera.attach(session, pinned=True)
        except VirtualCameraUnavailable as exc:
            raise ApiError(404, str(exc)) from None
    log.info("session %s: output %s (%s) -> %s", session.id, sink.id, sink.kind, sink.target)
    location = f"/api/sessions/{session.id}/outputs/{sink.id}"
    return json_response(sink.info(), status=201, headers={"Location": location})


async def delete_output(request: web.Request) -> web.Response:
    state, session = _session(request)
    authorize(state.config.token, request.headers.get("Authorization"), request.remote)
    sink = await session.egress.remove_output(request.match_info["output_id"])
    if sink is None:
        raise ApiError(404, f"no output {request.match_info['output_id']!r}")
    if state.virtual_camera is not None:
        state.virtual_camera.output_removed(sink)
    return json_response(sink.info())


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/sessions/{session_id}/outputs", list_outputs)
    r.add_post("/api/sessions/{session_id}/outputs", create_output)
    r.add_get("/api/sessions/{session_id}/outputs/{output_id}", get_output)
    r.add_delete("/api/sessions/{session_id}/outputs/{output_id}", delete_output)
