"""Where is a request now? Read from the same keys ``redis-cli`` shows (see docs/redis.md)."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from broker.connection import resolved
from broker.keys import WORKER_GROUP, Keys
from broker.protocol import Job


@dataclass
class Location:
    request_id: str
    #: unknown, queued, running, finished
    state: str
    worker: str | None = None
    worker_alive: bool = False
    #: 1-based place in the worker's queue of waiting jobs (queued only).
    position: int | None = None
    waiting: int | None = None
    #: Milliseconds since the worker took it (running only).
    running_ms: int | None = None

    def describe(self) -> str:
        where = f" on worker {self.worker}" + ("" if self.worker_alive else " (dead: the janitor will reclaim it)")
        if self.state == "queued":
            return f"{self.request_id}: queued{where}, {self.position} of {self.waiting} waiting"
        if self.state == "running":
            return f"{self.request_id}: running{where} for {(self.running_ms or 0) / 1000:.1f} s"
        if self.state == "finished":
            return f"{self.request_id}: finished (or cancelled), last placed{where}"
        return f"{self.request_id}: unknown (never dispatched, or finished long ago)"


async def locate(redis: Redis, keys: Keys, request_id: str) -> Location:
    """``redis`` must decode responses (stream payloads are skipped, only routing fields are read)."""
    worker, model = await resolved(redis.hmget(keys.request(request_id), ["worker", "model"]))
    if worker is None or model is None:
        return Location(request_id, "unknown")
    alive = bool(await redis.exists(keys.worker(worker)))
    stream = keys.jobs(model, worker)
    try:
        pending = {p["message_id"]: p for p in await redis.xpending_range(stream, WORKER_GROUP, "-", "+", 10_000)}
    except ResponseError:
        pending = {}
    waiting = 0
    entries = await redis.execute_command(  # type: ignore[no-untyped-call]  # redis-py: no annotations
        "XRANGE", stream, "-", "+", NEVER_DECODE=True)
    for eid, fields in entries or []:
        entry_id = eid.decode()
        mine = Job.request_id_of(fields) == request_id
        if entry_id in pending:
            if mine:
                idle = pending[entry_id].get("time_since_delivered", 0)
                return Location(request_id, "running", worker, alive, running_ms=int(idle))
            continue
        waiting += 1
        if mine:
            total = len(entries) - len(pending)
            return Location(request_id, "queued", worker, alive, position=waiting, waiting=total)
    return Location(request_id, "finished", worker, alive)
