"""Redis clients. Two flavours: text (decoded, for records a person reads) and raw (msgpack payloads)."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError


def connect(url: str, *, decode: bool = True, **kwargs: object) -> Redis:
    """A client that retries a dropped connection with backoff instead of failing at once."""
    return Redis.from_url(
        url,
        decode_responses=decode,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5),
        retry_on_error=[ConnectionError, TimeoutError],
        health_check_interval=30,
        **kwargs,
    )
