"""HTTP plumbing shared by the handlers: JSON bodies in and out, errors as JSON, CORS for WHIP/WHEP."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable, Optional, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from server.errors import ApiError, validation_details
from server.ops.guard import OriginPolicy
from server.schemas import ErrorBody

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# RFC 9725 §4.7: WHIP/WHEP are called from pages of other origins (and by OBS, which ignores
# CORS). Which origins may is configured (`cors_origins`, '*' for any); none: same origin only.
CORS_PREFIXES = ("/whip", "/whep", "/api/")
JSON_TYPE = "application/json"
EXPOSED_HEADERS = "Location, ETag, Link, Accept-Post, Accept-Patch, WWW-Authenticate, Allow"


def json_response(model: BaseModel, status: int = 200, exclude_none: bool = False,
                  headers: Optional[dict[str, str]] = None) -> web.Response:
    text = model.model_dump_json(exclude_none=exclude_none)
    return web.Response(text=text, status=status, content_type="application/json", headers=headers)


def error_response(status: int, message: str, details: Optional[list] = None,
                   headers: Optional[dict[str, str]] = None) -> web.Response:
    return json_response(ErrorBody(error=message, details=details), status, exclude_none=True, headers=headers)


def parse_json(text: bytes | str) -> Any:
    """JSON from a client: ValueError for anything that is not plain JSON, nesting too deep for
    the parser (RecursionError) and NaN/Infinity included."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, parse_constant=no_constants)
    except RecursionError:
        raise ValueError("nested too deeply") from None


async def read_json(request: web.Request, model: type[M]) -> M:
    """The request body as `model`: 415 unless it is sent as JSON (a cross-site page can send
    other types without a CORS preflight), 400 when it is not JSON, 422 when it does not validate."""
    if request.content_type != JSON_TYPE and not request.content_type.endswith("+json"):
        raise ApiError(415, f"the body must be sent as Content-Type: {JSON_TYPE}")
    try:
        data = parse_json(await request.read())
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, f"invalid {model.__name__}", validation_details(exc)) from None


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON {error, details?}, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.details, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, exc.reason, headers=allow)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal server error")


def cors_middleware(origins: OriginPolicy) -> Callable:
    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        """CORS headers on API/WHIP/WHEP responses, errors included (outermost middleware), for
        the configured origins only."""
        response = await handler(request)
        if request.path.startswith(CORS_PREFIXES):
            origin = request.headers.get("Origin")
            if origins.any:
                response.headers["Access-Control-Allow-Origin"] = "*"
            elif origin and origins.listed(origin):
                response.headers["Access-Control-Allow-Origin"] = origin
                response.headers["Vary"] = "Origin"
            else:
                return response
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        return response

    return cors


def preflight(methods: str, accept_post: bool = False) -> web.Response:
    """The answer to OPTIONS on a WHIP/WHEP URL (a CORS preflight needs no token)."""
    headers = {
        "Allow": methods,
        "Access-Control-Allow-Methods": methods,
        "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
        "Access-Control-Max-Age": "86400",
    }
    if accept_post:
        headers["Accept-Post"] = "application/sdp"
    return web.Response(status=204, headers=headers)
