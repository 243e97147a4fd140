"""Errors in OpenAI's shape, and the middleware that turns every failure into one."""

from __future__ import annotations

import logging

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.schemas import ErrorBody, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> bytes:
    return msgspec.json.encode(ErrorResponse(ErrorBody(message, error_type(status), param, code)))


def error_response(error: ApiError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error_body(error.status, error.message, error.param, error.code),
        content_type="application/json",
        headers=error.headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as exc:
        logger.info("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (404 route, 405, 413 body too large) in OpenAI's shape too.
        message = exc.text or exc.reason
        if exc.status == 413:
            message = f"request body too large: {exc.text}"
        return error_response(ApiError(exc.status, message or exc.reason))
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return error_response(ApiError(500, "internal server error"))
