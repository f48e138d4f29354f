"""``redserve status`` and ``redserve inspect``: read from the same keys redis-cli shows."""

from __future__ import annotations

import time

from broker.connection import connect
from broker.ids import request_id
from broker.inspect import locate
from broker.keys import Keys
from broker.registry import Registry, WorkerRecord
from broker.settings import Settings

COLUMNS = ("WORKER ID", "MODELS", "ENGINE", "STATUS", "QUEUE", "MAX", "SPEED", "HOST", "PID", "UP", "HEARTBEAT")


def rows(workers: list[WorkerRecord], now: float) -> list[tuple[str, ...]]:
    return [
        (w.id, ",".join(w.models), w.engine, w.status, str(w.queue), str(w.max_concurrency), f"{w.speed:g}",
         w.host, str(w.pid), _ago(now - w.started_at), _ago(now - w.last_heartbeat) + " ago")
        for w in sorted(workers, key=lambda w: (w.models, w.id))
    ]


def table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body])


async def print_status(redis_url: str, settings: Settings) -> int:
    redis = connect(redis_url, decode=True)
    try:
        workers = await Registry(redis, Keys(settings.key_prefix)).live_workers()
    finally:
        await redis.aclose()
    print(table(COLUMNS, rows(workers, time.time())))
    return 0


async def print_location(redis_url: str, settings: Settings, response_id: str) -> int:
    """Exit status 0 when the request is known, 1 when it is not."""
    rid = request_id(response_id) or response_id  # a malformed id is simply unknown
    redis = connect(redis_url, decode=True)
    try:
        where = await locate(redis, Keys(settings.key_prefix), rid)
    finally:
        await redis.aclose()
    print(where.describe())
    return 0 if where.state != "unknown" else 1


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"
