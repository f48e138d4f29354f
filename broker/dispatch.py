"""The stateless dispatcher: pick a worker and enqueue a job in one atomic step.

Any number of gateways and batch runners may dispatch at once; the pick, the
load increment and the XADD happen inside one Lua script, so two dispatchers
never both see the same worker as idle.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from broker.errors import Busy, Gone, NoRoom, NoWorker, UnknownModel
from broker.keys import Keys
from broker.lane import Lane, run_script
from broker.protocol import Job, as_str
from broker.scripts import Scripts
from broker.settings import DispatchMethod

_ERRORS = {"UNKNOWN_MODEL": UnknownModel, "NO_WORKER": NoWorker, "BUSY": Busy, "NO_ROOM": NoRoom, "GONE": Gone}


@dataclass(frozen=True, slots=True)
class Dispatched:
    worker_id: str
    entry_id: str
    #: The worker's queue length including this job.
    queue: int


class Dispatcher:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        method: DispatchMethod = "shortest_queue",
        scripts: Scripts | None = None,
        *,
        replica_acks: int = 0,
        replica_ack_timeout: float = 0.5,
        batch_share: float = 0.0,
        lane: Lane | None = None,
    ) -> None:
        """``replica_acks``: replicas that must hold each dispatched job (WAIT) before ``dispatch`` returns, so
        a failover right after cannot lose it; at most ``replica_ack_timeout`` is spent waiting.
        ``lane``: the pipelined connection dispatches go out on (``broker.lane``; None: redis-py's pool).
        ``batch_share`` > 0 makes this a batch dispatcher: jobs go only into batch room (NoRoom otherwise)."""
        self.batch_share = batch_share
        self.lane = lane
        self.redis = redis
        self.replica_acks = replica_acks
        self.replica_ack_ms = int(replica_ack_timeout * 1000)
        self.keys = keys
        self.method = method
        self.scripts = scripts or Scripts.register(redis)
        self._rng = random.Random()
        #: (method, outcome) -> count, for metrics: outcome is placed, busy, no_worker, unknown_model or gone.
        self.decisions: Counter[tuple[str, str]] = Counter()

    async def dispatch(
        self, job: Job, method: DispatchMethod | None = None, *, move_from: tuple[str, str] | None = None,
        meta: bytes = b"", owner: str = "", share: float | None = None,
    ) -> Dispatched:
        """Enqueue ``job`` on the chosen worker's stream; raises UnknownModel, NoWorker or Busy.

        ``move_from=(stream, entry_id)`` moves a job off a dead worker's stream in
        the same atomic step (Gone if another janitor moved it first). ``meta``
        starts the request's replay log when ``job.replay_ms`` asks for one.
        ``owner`` records the tenant the request belongs to (empty on a
        re-dispatch, which keeps the owner already recorded). ``share``
        overrides this dispatcher's batch share (the janitor moves any job as
        interactive: it was admitted already).
        """
        k = self.keys
        source, entry_id = move_from or ("", "")
        ttl_ms = max(1000, int((job.deadline - time.time()) * 1000) + 60_000) if job.deadline else 3_600_000
        fields = [x for kv in job.to_fields().items() for x in kv]
        keys = [k.model_workers(job.model), k.model_seen(job.model), k.request(job.request_id),
                k.replay(job.request_id)]
        args = [method or self.method, self._rng.random(), k.seat_prefix(job.model), k.jobs_prefix(job.model),
                job.model, ttl_ms,
                source, entry_id, job.replay_ms, meta, owner, job.attempt,
                self.batch_share if share is None else share, *fields]
        try:
            wid, entry, queue = await self._run(keys, args)
        except ResponseError as exc:
            word, _, message = str(exc).partition(" ")
            self.decisions[(method or self.method, word.lower())] += 1
            if word in _ERRORS:
                raise _ERRORS[word](
                    f"The model `{job.model}` does not exist." if word == "UNKNOWN_MODEL" else message,
                    param="model",
                ) from None
            raise
        self.decisions[(method or self.method, "placed")] += 1
        return Dispatched(worker_id=as_str(wid), entry_id=as_str(entry), queue=int(queue))


    async def _run(self, keys: list[str], args: list[Any]) -> list[Any]:
        """The dispatch script; with ``replica_acks``, followed by WAIT on the same connection (a pipeline), so
        the wait covers this very write. A failed WAIT (a failover under way) does not fail the dispatch."""
        if not self.replica_acks:
            placed: list[Any] = await run_script(self.lane, self.scripts.dispatch, keys, args)
            return placed
        script = self.scripts.dispatch
        for _ in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.execute_command("WAIT", self.replica_acks, self.replica_ack_ms)
                placed, _acks = await pipe.execute(raise_on_error=False)
            if isinstance(placed, NoScriptError):  # Redis restarted: load it (dispatch is idempotent: run again)
                await self.redis.script_load(script.script)
                continue
            if isinstance(placed, Exception):
                raise placed
            return list(placed)
        raise NoScriptError("the dispatch script could not be loaded")
