"""Pub/sub that outlives Redis going away, and who listens on a channel.

Both the reply router (a gateway's reply channel) and a worker (its control
channel) hold one subscription for their whole life; when Redis restarts,
fails over or the connection is cut, they subscribe again with a short
backoff and are told so (``on_up(recovered=True)``), since whatever was
published meanwhile reached nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


async def subscribe_forever(redis: Redis, channel: str, on_message: Callable[[bytes], None], *,
                            on_up: Callable[[bool], None] | None = None,
                            on_down: Callable[[BaseException, bool], None] | None = None,
                            max_delay: float = 0.25) -> None:
    """Deliver every message of ``channel`` to ``on_message`` until cancelled.

    ``on_up(recovered)`` runs each time the subscription is (re)established;
    ``on_down(exc, first)`` each time it breaks (``first``: the first failure
    since it was last up).
    """
    delay, down = 0.05, False
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            if on_up is not None:
                on_up(down)
            delay, down = 0.05, False
            async for msg in pubsub.listen():
                on_message(msg["data"])
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if on_down is not None:
                on_down(exc, not down)
            down = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py's PubSub.aclose has no hints


async def listeners(redis: Redis, channel: str) -> int:
    """How many connections are subscribed to ``channel`` now (0: whoever listened is gone)."""
    [(_, count)] = await redis.pubsub_numsub(channel)
    return int(count)
