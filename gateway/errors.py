"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException

from broker.errors import BrokerError
from gateway.schemas import BadInput, printable

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable", 504: "timeout"}
#: Error replies with which a reachable Redis refuses work for now (redis-py has no class of their own for these).
_UNAVAILABLE = ("MASTERDOWN", "MISCONF", "BUSY", "NOREPLICAS", "TRYAGAIN")


class APIError(Exception):
    """An error the gateway answers with directly."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type or _TYPES.get(status, "server_error"), param, code)
        self.headers = headers

    @classmethod
    def from_event(cls, ev: dict[str, Any]) -> "APIError":
        """From a worker's in-band error event."""
        return cls(ev.get("status") or 500, ev.get("message") or "error", type=ev.get("type"),
                   param=ev.get("param"), code=ev.get("code"))

    @classmethod
    def from_broker(cls, exc: BrokerError) -> "APIError":
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return cls(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=headers)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The error object; a message or param quoting the client's own bad text (a lone surrogate) stays encodable."""
    return {"error": {"message": printable(message), "type": type, "param": param and printable(param),
                      "code": code}}


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` the moment a body passes its cap; FastAPI lets an HTTPException through as is."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(413, f"The request body exceeds the limit of {limit} bytes ({setting}).")

    def api_error(self) -> APIError:
        # The rest of the body is never read: the connection closes after the answer.
        return APIError(413, str(self.detail), code="body_too_large", headers={"Connection": "close"})


def redis_error(exc: RedisError) -> APIError:
    """What a client hears when Redis fails under a request: 503 and when to retry, for an outage or a full Redis."""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):  # down, loading, refusing us
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

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(BrokerError)
    async def _broker(_: Request, exc: BrokerError) -> JSONResponse:
        return APIError.from_broker(exc).response()

    @app.exception_handler(RedisError)
    async def _redis(_: Request, exc: RedisError) -> JSONResponse:
        return redis_error(exc).response()

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return exc.api_error().response()

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
        return APIError(400, msg, param=param, code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()
