"""Interactive traffic first: a batch job is dispatched only into room the model's workers have spare.

A worker's room for batch work is ``batch_share`` of its ``max_concurrency``
(at least one slot) minus its queue length, which counts interactive and
batch jobs alike (the score in the model's sorted set). While no worker of
the model has room, batch jobs wait; interactive requests never do, so they
find free slots instead of a queue full of batch work.

Admission is serialized per model in this process, and the next batch job
looks for room only once the previous one is on a worker's stream (the
dispatcher calls ``placed``), so the load it reads already counts it: a
runner never overshoots the share however many jobs it runs at once.
Several runners may overshoot by at most one job each.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextvars import ContextVar
from typing import AsyncIterator

from redis.asyncio import Redis

from broker.keys import Keys


class _Ticket:
    """A held admission: the model's lock, until the job is placed or its request ends."""

    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock: asyncio.Lock | None = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


#: The admission the current request holds (a context variable: each request task sees its own).
_HELD: ContextVar[_Ticket | None] = ContextVar("redserve_batch_admission", default=None)


class Admission:
    def __init__(self, redis: Redis, keys: Keys, share: float, *, max_wait: float = 0.05) -> None:
        """``redis`` must decode responses (worker records are read as text)."""
        self.redis = redis
        self.keys = keys
        self.share = share
        self.max_wait = max_wait
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def admit(self, model: str | None) -> AsyncIterator[None]:
        """Wait for room on the model's workers, then run the body (which dispatches the job).

        A model nobody ever announced is let through at once: its request
        fails with the usual 404 rather than waiting for workers that will
        never come. A known model without live workers waits for one.
        """
        if not model:
            yield
            return
        lock = self._locks.setdefault(model, asyncio.Lock())
        await lock.acquire()
        ticket = _Ticket(lock)
        token = _HELD.set(ticket)
        try:
            await self._until_room(model)
            yield
        finally:
            _HELD.reset(token)
            ticket.release()

    @staticmethod
    def placed() -> None:
        """The current request's job is on a worker's stream: the next batch job may look for room."""
        ticket = _HELD.get()
        if ticket is not None:
            ticket.release()

    async def room(self, model: str) -> tuple[int, bool]:
        """(batch slots free on the model's ready workers, whether the model was ever announced)."""
        members = await self.redis.zrange(self.keys.model_workers(model), 0, -1, withscores=True)
        if not members:
            return 0, await self.redis.zscore(self.keys.models(), model) is not None
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid, _ in members:
                pipe.hmget(self.keys.worker(wid), ["status", "max_concurrency"])
            records = await pipe.execute()
        free = 0
        for (_, queue), (status, concurrency) in zip(members, records):
            if status == "ready":
                free += max(0, max(1, int(int(concurrency or 1) * self.share)) - int(queue))
        return free, True

    async def _until_room(self, model: str) -> None:
        delay = 0.002
        while True:
            free, known = await self.room(model)
            if free > 0 or not known:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_wait)
