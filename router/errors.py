"""OpenAI-shaped errors, and the handlers that give every error that shape.

Every error the router answers, whatever raised it, has the body

    {"error": {"message": str, "type": str, "param": str | null, "code": str | int | null}}

where type is "invalid_request_error" (4xx), "service_unavailable" (503) or
"server_error" (other 5xx). OpenAI clients read `error.message` from it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("splitserve.router")


def error_type(status: int) -> str:
    if status == 503:
        return "service_unavailable"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(
    message: str,
    status: int,
    *,
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    """The `{"error": {...}}` object, for JSON responses and SSE error events."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


class APIError(Exception):
    """An error answered to the client as HTTP `status` with the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def no_capacity(message: str) -> APIError:
    """503 with Retry-After: the cluster is full (or down) now, not forever."""
    return APIError(503, message, code="no_capacity", headers={"Retry-After": "1"})


def install_error_handlers(app: FastAPI) -> None:
    """Give FastAPI's own errors (validation, 404, 405, crashes) the OpenAI shape."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        # Bodies are parsed by hand (see server.py); this catches query and
        # path parameters. OpenAI answers 400, not FastAPI's 422.
        assert isinstance(exc, RequestValidationError)
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg', 'invalid request')}" if param else "invalid request"
        return APIError(400, msg, param=param).response()

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers) if exc.headers else None
        return APIError(exc.status_code, str(exc.detail), headers=headers).response()

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        # The exception's text stays in the log: it may hold paths, addresses
        # or a client's own input, and it tells the client nothing it can fix.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal error (logged by the router)").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)
