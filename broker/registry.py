"""The worker registry: TTL'd worker records and per-model load sorted sets.

A worker is alive exactly as long as its record key exists; nothing has to
notice a dead worker, its key just expires and the dispatcher prunes it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from broker import __version__
from broker.connection import execute, resolved
from broker.keys import WORKER_GROUP, Keys
from broker.scripts import Scripts

#: How long a model stays known (dispatch answers "no worker", 503, rather than "unknown model", 404) after
#: its last worker announced it.
SEEN_MS = 7 * 24 * 3600 * 1000


@dataclass
class WorkerRecord:
    """What a worker says about itself; every field is a plain string in Redis."""

    id: str
    models: list[str]
    engine: str
    speed: float = 1.0
    max_concurrency: int = 1
    #: Jobs (running + waiting) beyond which dispatch skips this worker; 0 = unbounded.
    max_queue: int = 0
    status: str = "ready"
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)
    version: str = __version__
    #: Longest prompt + completion the model takes, in tokens (0 = unknown).
    context_length: int = 0
    #: Where the served model came from (a directory or a hub id; empty when the engine has none).
    root: str = ""
    #: Per model, where a worker serves several that differ (``--model NAME=PATH``): name -> context length,
    #: name -> root. Stored as ``context_length:<name>`` and ``root:<name>`` fields beside the defaults above.
    contexts: dict[str, int] = field(default_factory=dict)
    roots: dict[str, str] = field(default_factory=dict)
    #: Counters since start: jobs finished and tokens produced.
    jobs_done: int = 0
    tokens_out: int = 0
    #: Only filled when read back from Redis (and kept by the worker itself): running + waiting, all models.
    queue: int = 0
    #: The worker's own count per model (its job stream's length), as it last saw it; never stored as such.
    queues: dict[str, int] = field(default_factory=dict)
    last_heartbeat: float = 0.0

    def to_fields(self) -> dict[str, str]:
        return {
            "id": self.id,
            "models": ",".join(self.models),
            "engine": self.engine,
            "speed": repr(self.speed),
            "max_concurrency": str(self.max_concurrency),
            "max_queue": str(self.max_queue),
            "status": self.status,
            "host": self.host,
            "pid": str(self.pid),
            "started_at": f"{self.started_at:.3f}",
            "version": self.version,
            "context_length": str(self.context_length),
            "root": self.root,
            "jobs_done": str(self.jobs_done),
            "tokens_out": str(self.tokens_out),
            **{f"context_length:{m}": str(n) for m, n in self.contexts.items()},
            **{f"root:{m}": r for m, r in self.roots.items()},
        }

    def context_of(self, model: str) -> int:
        """The context length of ``model`` on this worker (0 = unknown)."""
        return self.contexts.get(model, self.context_length)

    def root_of(self, model: str) -> str:
        """Where ``model`` on this worker came from."""
        return self.roots.get(model, self.root)

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> WorkerRecord:
        return cls(
            id=fields["id"],
            models=[m for m in fields.get("models", "").split(",") if m],
            engine=fields.get("engine", ""),
            speed=float(fields.get("speed", 1)),
            max_concurrency=int(fields.get("max_concurrency", 1)),
            max_queue=int(fields.get("max_queue", 0)),
            status=fields.get("status", "ready"),
            host=fields.get("host", ""),
            pid=int(fields.get("pid", 0)),
            started_at=float(fields.get("started_at", 0)),
            version=fields.get("version", ""),
            context_length=int(fields.get("context_length", 0)),
            root=fields.get("root", ""),
            jobs_done=int(fields.get("jobs_done", 0)),
            tokens_out=int(fields.get("tokens_out", 0)),
            queue=int(fields.get("queue", 0)),
            last_heartbeat=float(fields.get("last_heartbeat", 0)) / 1000,
            contexts={k.partition(":")[2]: int(v) for k, v in fields.items() if k.startswith("context_length:")},
            roots={k.partition(":")[2]: v for k, v in fields.items() if k.startswith("root:")},
        )


class Registry:
    """Reads and writes worker records. ``redis`` must decode responses."""

    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts or Scripts.register(redis)

    # --- the worker's side -------------------------------------------------
    async def heartbeat(self, record: WorkerRecord, ttl: float) -> int:
        """Create or refresh the worker's seat in each model's slot (consumer group included), its record, and
        its entry in the registry; returns the queue length, all models.

        A seat's ``others`` (the worker's queue of its other models, which dispatch adds to the model's own for
        the caps) is what this heartbeat counted: on Redis Cluster the models live in different slots, so no
        one step sees them all; it is exact for a worker of one model, and as of this heartbeat (or the worker's
        last finish) otherwise."""
        k, ttl_ms, now = self.keys, int(ttl * 1000), int(time.time() * 1000)
        seat = {"status": record.status, "speed": repr(record.speed), "max_queue": str(record.max_queue),
                "max_concurrency": str(record.max_concurrency)}

        async def beat(model: str, known: dict[str, int]) -> int:
            fields = {**seat, "others": str(sum(known.values()) - known.get(model, 0))}
            return int(await self.scripts.heartbeat(
                keys=[k.seat(model, record.id), k.model_workers(model), k.jobs(model, record.id), k.model_seen(model)],
                args=[ttl_ms, now, record.id, WORKER_GROUP, SEEN_MS, *(x for kv in fields.items() for x in kv)]))

        # registered first: a seat (and so a job) never exists that the janitor could not find
        await resolved(self.redis.hset(k.workers(), record.id, ",".join(record.models)))
        beats = await asyncio.gather(*(beat(m, record.queues) for m in record.models), return_exceptions=True)
        counted = {m: n for m, n in zip(record.models, beats) if isinstance(n, int)}
        if len(counted) == len(record.models) > 1 and counted != record.queues:  # ``others`` was stale
            beats = await asyncio.gather(*(beat(m, counted) for m in record.models), return_exceptions=True)
        record.queues |= {m: n for m, n in zip(record.models, beats) if isinstance(n, int)}
        record.queue = sum(record.queues.values())
        # the record is written even if one model's slot was unreachable: the worker is alive
        fields = {**record.to_fields(), "queue": str(record.queue), "last_heartbeat": str(now)}
        await self.scripts.record(keys=[k.worker(record.id)], args=[ttl_ms, *(x for kv in fields.items() for x in kv)])
        await resolved(self.redis.zadd(k.models(), dict.fromkeys(record.models, now)))
        for failed in beats:
            if isinstance(failed, BaseException):
                raise failed
        return record.queue

    async def finish(self, record: WorkerRecord, entry_id: str, model: str) -> int:
        """Ack and delete one finished job of ``model``; returns the worker's queue length left (all models, as
        far as it knows: its other models' counts are from their last finish or heartbeat)."""
        k = self.keys
        left = int(await self.scripts.finish(keys=[k.jobs(model, record.id), k.model_workers(model)],
                                             args=[WORKER_GROUP, entry_id, record.id]))
        record.queues[model] = left
        record.queue = sum(record.queues.values())
        return record.queue

    async def deregister(self, record: WorkerRecord) -> None:
        """Leave cleanly: record, seats, load entries and the (now empty) streams go; one command per key, as
        they live in different slots on a cluster."""
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in record.models:
                pipe.zrem(k.model_workers(m), record.id)
                pipe.delete(k.seat(m, record.id))
                pipe.delete(k.jobs(m, record.id))
            pipe.delete(k.worker(record.id))
            pipe.hdel(k.workers(), record.id)
            await execute(pipe)

    # --- readers' side -----------------------------------------------------
    async def live_workers(self) -> list[WorkerRecord]:
        """Every worker whose record still exists.

        An id whose record expired stays in the registry hash: it is how the
        janitor finds a dead worker's jobs, and only the janitor removes it,
        once they are reclaimed.
        """
        ids = sorted(await resolved(self.redis.hkeys(self.keys.workers())))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hgetall(self.keys.worker(wid))
            records = await execute(pipe)
        return [WorkerRecord.from_fields(rec) for rec in records if rec]


def serving(workers: Iterable[WorkerRecord], model: str) -> list[WorkerRecord]:
    return [w for w in workers if model in w.models]
