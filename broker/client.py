"""The broker as one object: what a gateway or batch runner holds to submit jobs.

It owns the Redis clients, the registry, the dispatcher, this process's reply
router and its janitor; ``submit`` ties them together in the order that
matters: open the reply stream first, then dispatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import ResponseError

from broker.connection import UNREACHABLE, connect, execute, is_cluster
from broker.dispatch import Dispatcher
from broker.errors import NoWorker, RedisUnavailable, UnknownModel, WorkerLost
from broker.ids import new_request_id
from broker.janitor import Janitor
from broker.keys import Keys
from broker.lane import Lane, run_script
from broker.protocol import Cancel, Job, JobKind, Params, Reply, Resend, StreamMeta, as_str, pack
from broker.pubsub import publish, publish_command
from broker.registry import Registry, WorkerRecord
from broker.replay import Replay, follow, open_log
from broker.replies import ReplyRouter, ReplyStream
from broker.scripts import Scripts
from broker.settings import DispatchMethod, Settings
from broker.tenants import ANONYMOUS, Tenant, well_formed

T = TypeVar("T")


class BrokerClient:
    def __init__(self, redis_url: str, settings: Settings, *, gateway_id: str | None = None, janitor: bool = True,
                 batch: bool = False) -> None:
        """``batch``: this client dispatches batch work, only into the room ``batch_share`` leaves.
        (``settings.redis_url`` is not read: the caller resolved it into ``redis_url``.)"""
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._text = connect(redis_url, decode=True)
        self._raw = connect(redis_url, decode=False)
        if settings.replica_acks and is_cluster(self._raw):
            raise ValueError("replica_acks (WAIT) needs one Redis or Sentinel: a cluster's dispatch and WAIT would "
                             "run on different connections; set replica_acks 0 with a redis+cluster:// URL")
        self.scripts = Scripts.register(self._raw)
        self.lane = Lane.of(self._raw)
        self.registry = Registry(self._text, self.keys, Scripts.register(self._text))
        self.dispatcher = Dispatcher(self._raw, self.keys, settings.dispatch_method, self.scripts,
                                     replica_acks=settings.replica_acks,
                                     replica_ack_timeout=settings.replica_ack_timeout,
                                     batch_share=settings.batch_share if batch else 0.0, lane=self.lane)
        self.router = ReplyRouter(self._raw, self.keys, gateway_id, buffer=settings.stream_buffer,
                                  on_shed=self._shed, on_gap=self._ask_resend)
        self.janitor = Janitor(self._raw, self.keys, self.dispatcher, interval=settings.worker_ttl / 2) if janitor \
            else None
        self._background: set[asyncio.Task[None]] = set()
        self.dead_lettered = 0

    async def start(self) -> BrokerClient:
        await self.router.start()
        if self.janitor:
            self.janitor.start()
        return self

    async def close(self) -> None:
        if self.janitor:
            await self.janitor.stop()
        await self.router.stop()
        for task in list(self._background):
            task.cancel()
        if self.lane is not None:
            await self.lane.close()
        await self._text.aclose()
        await self._raw.aclose()

    async def __aenter__(self) -> BrokerClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(
        self,
        model: str,
        kind: JobKind,
        params: Params,
        *,
        timeout: float | None = None,
        method: DispatchMethod | None = None,
        replay_meta: StreamMeta | None = None,
        owner: Tenant = ANONYMOUS,
    ) -> ReplyStream:
        """Dispatch one job; the returned stream yields its reply events.

        Raises UnknownModel, NoWorker or Busy (and closes the stream) when
        the job could not be placed. With ``replay_meta`` (what a resumer needs
        to render the stream) the worker also keeps a replay log of its replies.
        The request (cancel, resume) belongs to ``owner``.
        """
        timeout = timeout or self.settings.reply_timeout
        if not await self.router.wait_live(self.settings.redis_wait):
            raise RedisUnavailable(f"This gateway has had no reply channel for {self.settings.redis_wait:g} s "
                                   "(redis_wait): Redis is unreachable.")
        stream = self.router.open(timeout, new_request_id(model))
        stream.job = job = Job(
            request_id=stream.rid,
            model=model,
            kind=kind,
            reply_to=self.router.channel,
            params=params,
            deadline=time.time() + timeout,
            replay_ms=int(self.settings.replay_window * 1000) if replay_meta is not None else 0,
        )
        stream.retry = self._retry
        try:
            placed = await self._patiently(lambda: self.dispatcher.dispatch(
                job, method, meta=b"" if replay_meta is None else pack(replay_meta), owner=owner.id))
        except BaseException:
            stream.close()
            raise
        stream.worker_id = placed.worker_id
        return stream

    async def _patiently(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, tried again for up to ``redis_wait`` seconds while Redis is unreachable, or while it is
        so freshly back that workers have not announced themselves again (a Redis that came back empty
        knows no model until their next heartbeat)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.settings.redis_wait
        delay = 0.05
        while True:
            try:
                return await call()
            except UNREACHABLE:
                if loop.time() + delay > end:
                    raise
            except (UnknownModel, NoWorker):
                fresh = self.router.recovered_at and loop.time() - self.router.recovered_at < self.settings.worker_ttl
                if not fresh or loop.time() + delay > end:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _retry(self, stream: ReplyStream) -> None:
        """Re-dispatch a job whose worker died before the client saw any of it."""
        job = stream.job
        assert job is not None
        job.attempt += 1
        if job.attempt >= self.settings.max_attempts:
            await self.dead_letter(job, f"its worker died {job.attempt} times")
            raise WorkerLost(f"The request failed on {job.attempt} workers in a row; it was dead-lettered.")
        job.deadline = time.time() + stream.timeout
        # share 0: the job was admitted already (a batch job too); its retry is not a new admission
        placed = await self._patiently(lambda: self.dispatcher.dispatch(job, share=0.0))
        stream.worker_id = placed.worker_id

    async def dead_letter(self, job: Job, reason: str) -> None:
        self.dead_lettered += 1
        fields: dict[Any, Any] = {**job.to_fields(), "reason": reason, "failed_at": f"{time.time():.3f}"}
        await self._raw.xadd(self.keys.dead_letters(), fields, maxlen=10_000, approximate=True)

    async def cancel(self, request_id: str, tenant: Tenant = ANONYMOUS) -> str | None:
        """Cancel a request wherever it runs (any gateway may ask); returns its worker id.

        None if it is unknown, finished, or not ``tenant``'s to cancel.
        """
        wid = await self._placement(request_id, tenant)
        if wid is not None:
            await self._tell_cancel(wid, request_id)
        return wid

    async def _placement(self, request_id: str, tenant: Tenant = ANONYMOUS) -> str | None:
        """The worker a request runs on, if ``tenant`` may cancel it (cancel.lua)."""
        if not well_formed("request", request_id):
            return None
        try:
            found = await run_script(self.lane, self.scripts.cancel, [self.keys.request(request_id)],
                                     ["" if tenant.admin else tenant.id])
        except ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            return None  # a request placed by a gateway older than owners (a string key): it owns no one
        return as_str(found) if found else None

    async def _tell_cancel(self, worker_id: str, request_id: str) -> None:
        """Publish a Cancel on the worker's control channel (it stops the job, or skips it when read)."""
        await publish(self._raw, self.keys.worker_control(worker_id), pack(Cancel(request_id)), lane=self.lane)

    async def ping(self) -> None:
        """Raises if Redis is unreachable."""
        await self._text.ping()

    async def replay_log(self, request_id: str) -> Replay | None:
        """A resumable request's replay log as it stands; None when there is none."""
        return await open_log(self._raw, self.keys.replay(request_id))

    async def follow_replay(self, replay: Replay, block_ms: int) -> list[Reply]:
        """What was appended to a replay log since it was last read, waiting up to ``block_ms`` for it."""
        return await follow(self._raw, replay, block_ms)

    async def live_workers(self) -> list[WorkerRecord]:
        """Every worker alive now (its record exists)."""
        return await self.registry.live_workers()

    async def charge(self, key: str, limit: int, amount: int, window_ms: int) -> bool:
        """Add ``amount`` to a rate counter unless it is at ``limit`` already; whether it was charged. Limit 0
        settles (charges, never refuses, and creates no counter). The counter lives ``window_ms``."""
        return bool(await run_script(self.lane, self.scripts.ratelimit, [key], [limit, amount, window_ms]))

    async def add_vote(self, fields: dict[str, str], max_entries: int) -> str:
        """Append a vote to the votes stream (trimmed to ``max_entries``); its entry id."""
        entry_id: str = await self._text.xadd(self.keys.votes(), fields,  # type: ignore[arg-type]  # redis-py's field type is invariant
                                              maxlen=max_entries, approximate=False)
        return entry_id

    async def release(self, stream: ReplyStream) -> None:
        """Done with a stream: forget it, and cancel the job if it has not finished.

        The worker this gateway placed the job on is told first, one command: when hundreds of clients leave
        at once, each worker stops a round trip sooner than by looking the placement up. The placement is
        then looked up all the same, since a janitor may have moved a job whose worker died before starting it.
        """
        stream.close()
        if stream.finished:
            return
        for _ in range(2):  # once more after a dropped connection (redis-py's own retry did that before the lane)
            try:
                told = stream.worker_id
                if told:
                    await self._tell_cancel(told, stream.rid)
                placed = await self._placement(stream.rid)
                if placed is not None and placed != told:
                    await self._tell_cancel(placed, stream.rid)
                return
            except UNREACHABLE:
                continue
            except Exception:  # noqa: BLE001  # Redis refused: the worker will notice nobody listens
                return

    def _ask_resend(self, streams: list[ReplyStream]) -> None:
        """Ask the workers of ``streams`` to send again what these streams have not seen (fire and forget:
        a stream keeps asking while its gap stays open)."""
        wanted = [s for s in streams if s.worker_id and not s.finished]
        if wanted:
            task = asyncio.create_task(self._resend(wanted))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _resend(self, streams: list[ReplyStream]) -> None:
        with contextlib.suppress(*UNREACHABLE):
            async with self._raw.pipeline(transaction=False) as pipe:
                for s in streams:
                    pipe.execute_command(publish_command(pipe), self.keys.worker_control(s.worker_id or ""),
                                         pack(Resend(s.rid, s.next_seq, s.attempt, self.router.channel)))
                await execute(pipe)

    def _shed(self, stream: ReplyStream) -> None:
        task = asyncio.create_task(self.release(stream))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
