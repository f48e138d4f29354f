"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisClusterException, RedisError, ResponseError
from starlette.exceptions import HTTPException

from broker.connection import UNREACHABLE
from broker.errors import ServeError
from gateway.schemas import BadInput

#: Error replies with which a reachable Redis refuses work for now (redis-py has no class of their own for these).
_UNAVAILABLE = ("MASTERDOWN", "MISCONF", "BUSY", "NOREPLICAS", "TRYAGAIN")


class APIError(ServeError):
    """A refusal the gateway makes itself: ``ServeError`` with the status first, as HTTP code reads."""

    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(message, status=status, **details)


def response(exc: ServeError, *, close: bool = False) -> JSONResponse:
    """The HTTP answer of an error: its OpenAI body, status and headers (an ASGI app, so middleware answers
    with it too). ``close`` ends the connection after it, so an unread body is never read."""
    headers = {**(exc.headers or {}), "Connection": "close"} if close else exc.headers
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` the moment a body passes its cap; FastAPI lets an HTTPException through as is."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(413, f"The request body exceeds the limit of {limit} bytes ({setting}).")

    def api_error(self) -> ServeError:
        # The rest of the body is never read: the connection closes after the answer.
        return ServeError(str(self.detail), status=413, code="body_too_large", headers={"Connection": "close"})


def redis_error(exc: Exception) -> ServeError:
    """What a client hears when Redis fails under a request: 503 and when to retry, for an outage or a full Redis."""
    if isinstance(exc, UNREACHABLE):  # down, loading, refusing us, failing over
        return APIError(503, "Redis is unreachable; try again shortly.", code="redis_unavailable",
                        headers={"Retry-After": "1"})
    if isinstance(exc, OutOfMemoryError):  # maxmemory with noeviction: writes refused, nothing evicted
        return APIError(503, "Redis is full and takes no new work for now; try again later.",
                        code="redis_out_of_memory", headers={"Retry-After": "1"})
    if isinstance(exc, ReadOnlyError) or (isinstance(exc, ResponseError) and str(exc).startswith(_UNAVAILABLE)):
        return APIError(503, "Redis refused the request for now; try again shortly.", code="redis_unavailable",
                        headers={"Retry-After": "1"})
    return APIError(500, "The server failed while talking to Redis.", type="server_error", code="redis_error")


def install(app: FastAPI) -> None:
    """Route every error the app can raise into OpenAI's shape."""

    @app.exception_handler(ServeError)
    async def _serve(_: Request, exc: ServeError) -> JSONResponse:
        return response(exc)

    @app.exception_handler(RedisError)
    @app.exception_handler(RedisClusterException)  # redis-py's cluster client: not a RedisError
    async def _redis(_: Request, exc: Exception) -> JSONResponse:
        return response(redis_error(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return response(exc.api_error())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "Invalid request body.")
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, BadInput):
            param, msg = cause.param, f"Invalid value: {cause}."
        elif first.get("type") == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        elif first.get("type") == "json_invalid":
            msg = "The request body is not valid JSON."
        elif param:
            msg = f"Invalid value for '{param}': {msg}"
        return response(APIError(400, msg, param=param, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return response(APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)))
