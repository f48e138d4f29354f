"""The one error type: ``ServeError`` carries a refusal's HTTP status, OpenAI ``type``, ``code`` and ``param``
from wherever it is made (a gateway's validation, the dispatcher, a worker's engine) to the HTTP body.

It crosses Redis as a terminal ``Failure`` event (``event()``, back with ``from_event``) and reaches the
client as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (``body()``). Named kinds below
(and ``JobError`` in the workers, ``APIError`` in the gateway) only preset a status and code.
"""

from __future__ import annotations

from typing import Any

from broker.protocol import Failure

#: The OpenAI error type of a status, when the error names none.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 499: "cancelled", 503: "service_unavailable", 504: "timeout"}


class ServeError(Exception):
    #: What a kind of error presets; an instance may say otherwise.
    status: int = 500
    type: str | None = None
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.type = type or self.type or TYPES.get(self.status, "server_error")
        self.code = code or self.code
        self.param = param
        #: HTTP headers of the answer: "come back in a second" for a 429 or a 503 unless said otherwise.
        self.headers = headers if headers is not None else (
            {"Retry-After": "1"} if self.status in (429, 503) else None)

    def body(self) -> dict[str, Any]:
        """OpenAI's error object; a message or param quoting a client's unencodable text stays encodable."""
        return {"error": {"message": printable(self.message), "type": self.type,
                          "param": self.param and printable(self.param), "code": self.code}}

    def event(self) -> Failure:
        """The terminal event that carries this error over Redis."""
        return Failure(self.message, self.status, self.type or "server_error", self.code, self.param)

    @classmethod
    def from_event(cls, ev: Failure) -> ServeError:
        """Back from a worker's ``Failure``."""
        return cls(ev.message or "error", status=ev.status or 500, type=ev.type, code=ev.code, param=ev.param)


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot carry (lone surrogates) written as ``\\udXXX`` escapes."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


class UnknownModel(ServeError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class NoWorker(ServeError):
    status, type, code = 503, "service_unavailable", "no_worker"


class Busy(ServeError):
    """Every worker of the model is at its queue limit: come back later."""

    status, type, code = 429, "rate_limit_error", "queue_full"


class NoRoom(Busy):
    """No worker of the model has batch room now (its queue is at its batch share): a batch job waits."""

    code = "no_batch_room"


class Gone(ServeError):
    """The job to move was already moved by someone else."""

    status, type, code = 409, "conflict", "gone"


class WorkerLost(ServeError):
    """The worker running the job died after the client had already received part of the reply."""

    status, type, code = 503, "service_unavailable", "worker_lost"


class WorkerTimeout(ServeError):
    status, type, code = 504, "timeout", "worker_timeout"


class RedisUnavailable(ServeError):
    """Redis (or this process's reply subscription) stayed away past ``redis_wait``."""

    status, type, code = 503, "service_unavailable", "redis_unavailable"
