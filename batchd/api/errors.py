"""Every error becomes an OpenAI-shaped body here, and only here."""
from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..errors import BatchdError

log = logging.getLogger("batchd.api")


def error_response(status: int, message: str, type_: str, code: str | None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


async def batchd_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BatchdError)
    return error_response(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), "invalid_request_error", code,
                          headers=dict(exc.headers or {}))


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s", request.url.path)  # details stay in the log, not the body
    return error_response(500, "internal server error", "server_error", "internal_error")


HANDLERS = {BatchdError: batchd_error, HTTPException: http_error, Exception: unexpected_error}
