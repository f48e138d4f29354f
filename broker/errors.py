"""Errors the broker raises, each carrying the HTTP status a gateway answers with."""

from __future__ import annotations


class BrokerError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class UnknownModel(BrokerError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class NoWorker(BrokerError):
    status, type, code = 503, "service_unavailable", "no_worker"


class Busy(BrokerError):
    """Every worker of the model is at its queue limit: come back later."""

    status, type, code = 429, "rate_limit_error", "queue_full"


class NoRoom(Busy):
    """No worker of the model has batch room now (its queue is at its batch share): a batch job waits."""

    code = "no_batch_room"


class Gone(BrokerError):
    """The job to move was already moved by someone else."""

    status, type, code = 409, "conflict", "gone"


class WorkerLost(BrokerError):
    """The worker running the job died after the client had already received part of the reply."""

    status, type, code = 503, "service_unavailable", "worker_lost"


class WorkerTimeout(BrokerError):
    status, type, code = 504, "timeout", "worker_timeout"


class ReplyLost(BrokerError):
    """The reply channel broke (Redis went away) while the request was in flight."""

    status, type, code = 503, "service_unavailable", "reply_lost"


class RedisUnavailable(BrokerError):
    """Redis (or this process's reply subscription) stayed away past ``redis_wait``."""

    status, type, code = 503, "service_unavailable", "redis_unavailable"
