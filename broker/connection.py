"""Redis clients. Two flavours: text (decoded, for records a person reads) and raw (msgpack payloads)."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError


def connect(url: str, *, decode: bool = True, **kwargs: object) -> Redis:
    """A client that retries a dropped connection with backoff instead of failing at once.

    The backoff is short (about 1 s over its five tries): the callers that
    must outlast a longer outage (the outbox, the reply router, dispatch)
    wait on their own terms, and a Redis that is back is used at once.
    """
    return Redis.from_url(
        url,
        decode_responses=decode,
        retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), retries=5),
        retry_on_error=[ConnectionError, TimeoutError],
        health_check_interval=30,
        **kwargs,
    )
