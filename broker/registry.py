"""The worker registry: TTL'd worker records and per-model load sorted sets.

A worker is alive exactly as long as its record key exists; nothing has to
notice a dead worker, its key just expires and the dispatcher prunes it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from broker import __version__
from broker.connection import resolved
from broker.keys import WORKER_GROUP, Keys
from broker.scripts import Scripts


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
    #: Only filled when read back from Redis.
    queue: int = 0
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
        """Create or refresh the record and its consumer group; returns the queue length."""
        k = self.keys
        mpre, msuf = k.model_workers_parts()
        fields = [x for kv in record.to_fields().items() for x in kv]
        return int(
            await self.scripts.heartbeat(
                keys=[k.worker(record.id), k.workers(), k.models(), k.worker_jobs(record.id)],
                args=[int(ttl * 1000), int(time.time() * 1000), record.id, WORKER_GROUP, mpre, msuf,
                      len(record.models), *record.models, *fields],
            )
        )

    async def finish(self, record: WorkerRecord, entry_id: str, model: str) -> int:
        """Ack and delete one finished job of ``model``; returns the worker's queue length left."""
        k = self.keys
        return int(
            await self.scripts.finish(
                keys=[k.worker_jobs(record.id), k.worker(record.id), k.model_workers(model)],
                args=[WORKER_GROUP, entry_id, record.id, len(record.models)],
            )
        )

    async def deregister(self, record: WorkerRecord) -> None:
        """Leave cleanly: record, load entries and the (now empty) stream go."""
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(k.worker(record.id), k.worker_jobs(record.id))
            pipe.srem(k.workers(), record.id)
            for m in record.models:
                pipe.zrem(k.model_workers(m), record.id)
            await pipe.execute()

    # --- readers' side -----------------------------------------------------
    async def live_workers(self) -> list[WorkerRecord]:
        """Every worker whose record still exists.

        An id whose record expired stays in the set: it is how the janitor
        finds a dead worker's jobs, and only the janitor removes it, once
        they are reclaimed.
        """
        ids = sorted(await resolved(self.redis.smembers(self.keys.workers())))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hgetall(self.keys.worker(wid))
            records = await pipe.execute()
        return [WorkerRecord.from_fields(rec) for rec in records if rec]


def serving(workers: Iterable[WorkerRecord], model: str) -> list[WorkerRecord]:
    return [w for w in workers if model in w.models]
