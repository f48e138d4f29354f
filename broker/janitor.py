"""The janitor: what happens to the jobs of a worker that died.

Every gateway runs one; they coordinate through a short lock per dead worker
and an atomic move, so running many is safe and a crash half-way is simply
finished by the next round. For each entry left in a dead worker's stream:

- **never started** (not delivered): moved to a live worker, unless nobody
  waits for it any more (deadline passed, or its gateway's reply channel has
  no subscriber);
- **was running** (delivered, pending): its gateway is told ``lost``, and
  retries it transparently if nothing reached the client yet, else ends the
  stream with a clean error.

A worker counts as dead only when its record is missing on two sweeps in a
row: a Redis that was paused (or restarted) expires every record at once,
and live workers write theirs again within a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from enum import StrEnum

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from broker.connection import UNREACHABLE, execute, resolved
from broker.dispatch import Dispatcher
from broker.errors import Gone, ServeError
from broker.keys import WORKER_GROUP, Keys
from broker.protocol import Job, Reply, as_str
from broker.pubsub import listeners, publish

log = logging.getLogger(__name__)


class Fate(StrEnum):
    """What becomes of one entry left in a dead worker's stream."""

    #: It was running: its gateway decides (retry if the client saw nothing, else a clean error).
    LOST = "lost"
    #: Nobody waits for it any more (deadline passed, or its gateway is gone).
    DROP = "drop"
    #: It never started and is still wanted: another worker runs it.
    MOVE = "move"


def fate(*, running: bool, expired: bool, waited_for: bool) -> Fate:
    if running:
        return Fate.LOST
    if expired or not waited_for:
        return Fate.DROP
    return Fate.MOVE


def confirm_dead(missing: set[str], suspects: set[str]) -> tuple[set[str], set[str]]:
    """The two-sweep rule: dead are the workers missing now *and* on the last sweep; returns them and the
    suspects for the next sweep (those missing now)."""
    return missing & suspects, missing


class Janitor:
    def __init__(self, redis: Redis, keys: Keys, dispatcher: Dispatcher, *, interval: float = 5.0,
                 lock_ttl: float = 30.0) -> None:
        """``redis`` must be a raw (non-decoding) client."""
        self.redis = redis
        self.keys = keys
        self.dispatcher = dispatcher
        self.interval = interval
        self.lock_ttl = lock_ttl
        self.moved = 0
        self.lost = 0
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None
        #: Workers whose record was missing on the last sweep: dead if it is still missing on this one.
        self._suspects: set[str] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="janitor")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except UNREACHABLE as exc:
                log.warning("janitor sweep failed: %s", exc)
            except Exception:
                log.exception("janitor sweep failed")

    async def sweep(self) -> list[str]:
        """One round: reclaim every dead worker this janitor gets the lock for; returns their ids."""
        found = await resolved(self.redis.hgetall(self.keys.workers()))
        registered = {as_str(w): as_str(m) for w, m in found.items()}
        ids = list(registered)
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.exists(self.keys.worker(wid))
            alive = await execute(pipe)
        reclaimed = []
        missing = {wid for wid, is_alive in zip(ids, alive) if not is_alive}
        dead, self._suspects = confirm_dead(missing, self._suspects)
        for wid in sorted(dead):
            if await self.redis.set(self.keys.reclaim_lock(wid), "1", nx=True, px=int(self.lock_ttl * 1000)):
                await self.reclaim(wid, [m for m in registered[wid].split(",") if m])
                reclaimed.append(wid)
        return reclaimed

    async def reclaim(self, worker_id: str, models: list[str]) -> None:
        """Decide the fate of every job left in the dead worker's streams (one per model), then forget it."""
        for model in models:
            await self._reclaim_stream(self.keys.jobs(model, worker_id))
            async with self.redis.pipeline(transaction=False) as pipe:  # one slot per model on a cluster
                pipe.delete(self.keys.jobs(model, worker_id))
                pipe.zrem(self.keys.model_workers(model), worker_id)
                await execute(pipe)
        await resolved(self.redis.hdel(self.keys.workers(), worker_id))
        log.info("reclaimed the jobs of dead worker %s", worker_id)

    async def _reclaim_stream(self, stream: str) -> None:
        running = await self._pending_ids(stream)
        for eid, fields in await self.redis.xrange(stream):
            entry_id = eid.decode()
            job = Job.from_fields(entry_id, fields)
            is_running, expired = entry_id in running, job.expired()
            waited_for = not (is_running or expired) and await self._someone_waits(job)
            match fate(running=is_running, expired=expired, waited_for=waited_for):
                case Fate.LOST:
                    await self._tell_lost(job)
                    await self.redis.xdel(stream, entry_id)
                case Fate.DROP:
                    self.dropped += 1
                    await self.redis.xdel(stream, entry_id)
                case Fate.MOVE:
                    await self._move(job, stream, entry_id)

    async def _move(self, job: Job, stream: str, entry_id: str) -> None:
        try:
            await self.dispatcher.dispatch(job, move_from=(stream, entry_id), share=0.0)
            self.moved += 1
        except Gone:
            pass
        except ServeError:  # nowhere to go now: let its gateway decide (retry later or fail)
            await self._tell_lost(job)
            await self.redis.xdel(stream, entry_id)

    async def _tell_lost(self, job: Job) -> None:
        self.lost += 1
        await publish(self.redis, job.reply_to, Reply.worker_lost(job.request_id, job.attempt).encode())

    async def _someone_waits(self, job: Job) -> bool:
        return await listeners(self.redis, job.reply_to) > 0

    async def _pending_ids(self, stream: str) -> set[str]:
        try:
            rows = await self.redis.xpending_range(stream, WORKER_GROUP, min="-", max="+", count=100_000)
        except ResponseError:  # NOGROUP: the stream (or its group) is already gone
            return set()
        return {as_str(r["message_id"]) for r in rows}
