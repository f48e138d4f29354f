"""Batch jobs: the Python API (``BatchClient``) and the arq plumbing of the batch runner.

This is the only module that imports arq. arq is in maintenance mode and pins
redis < 6, so everything arq-specific stays here: the queue connection, the
job function and the worker options. Replacing arq means rewriting this file
alone. Jobs travel msgpack-encoded, never pickled.

arq may run a job more than once (a runner dies mid-job, or its lease lapses);
each attempt dispatches with its own request id, and the result is stored
exactly once (``broker.batch_store``), so repeats are harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix
from arq.jobs import Job as ArqJob
from arq.jobs import JobStatus
from arq.worker import Retry, Worker, func
from redis.exceptions import WatchError

from broker.batch_store import BatchStore, Request, line_problem
from broker.connection import UNREACHABLE, connection_pool
from broker.errors import ServeError
from broker.keys import Keys
from broker.protocol import BatchTask, FinishBatch, RunLine, RunRequest, StartBatch, batch_task, pack, unpack
from broker.settings import Settings
from broker.tenants import ANONYMOUS, Tenant

log = logging.getLogger(__name__)
#: What ends arq's worker when Redis goes away. WatchError too: redis-py turns a connection lost under arq's
#: WATCH (its job claim) into one, and arq lets it out of its poll loop.
_REDIS_LOST: tuple[type[BaseException], ...] = (*UNREACHABLE, WatchError)

#: The one arq function a runner registers; a job's first argument names its task.
FUNCTION = "redserve.batch"
#: Attempts at one job before it is stored as failed (each runner death costs one).
MAX_TRIES = 5
#: Seconds between arq's looks at the queue.
POLL_DELAY = 0.05


@dataclass(frozen=True, slots=True)
class Attempt:
    job_id: str
    #: 1 for the first run; arq counts up each time it runs the job again.
    number: int


class Handler(Protocol):
    """What a batch runner implements; arq calls it for every job."""

    async def handle(self, task: BatchTask, attempt: Attempt) -> None: ...

    async def close(self) -> None: ...


HandlerFactory = Callable[[str, Settings], Awaitable[Handler]]


class JobState(StrEnum):
    QUEUED = "queued"
    DEFERRED = "deferred"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"
    NOT_FOUND = "not_found"


class BatchJobError(ServeError):
    """The job ended with an error response: its HTTP status and OpenAI error object (``status_code``,
    ``error``), as a ``ServeError``."""

    def __init__(self, status_code: int, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message") or "error"), status=status_code, type=error.get("type"),
                         code=error.get("code"), param=error.get("param"))
        self.status_code = status_code
        self.error = error

    def __str__(self) -> str:
        return f"{self.status_code}: {self.message}"


ABORTED = ServeError("The job was aborted.", status=499, type="invalid_request_error", code="cancelled").body()


class BatchJob:
    """A handle on one enqueued request."""

    def __init__(self, job_id: str, client: BatchClient) -> None:
        self.id = job_id
        self._client = client

    def __repr__(self) -> str:
        return f"BatchJob({self.id!r})"

    async def status(self) -> JobState:
        return await self._client.status(self.id)

    async def abort(self) -> bool:
        return await self._client.abort(self.id)

    async def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The OpenAI-shaped response (a ChatCompletion, Completion or embedding list), waiting up to ``timeout``.

        Raises BatchJobError for an error response (a bad request, an unknown
        model, an aborted job), TimeoutError past ``timeout`` and LookupError
        for a job that does not exist.
        """
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        delay = 0.02
        while True:
            stored = await self._client.store.job_result(self.id)
            if stored is None and await self.status() is JobState.NOT_FOUND:
                stored = await self._client.store.job_result(self.id)  # it may have finished just now
                if stored is None:
                    raise LookupError(f"No batch job {self.id!r} is queued, running or finished.")
            if stored is not None:
                if 200 <= stored["status_code"] < 300:
                    body: dict[str, Any] = stored["body"]
                    return body
                raise BatchJobError(stored["status_code"], stored["body"].get("error") or stored["body"])
            if end is not None and loop.time() + delay > end:
                raise TimeoutError(f"Batch job {self.id!r} has no result after {timeout:g} s.")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)


class BatchClient:
    """Enqueue requests for the batch runners, follow them, abort them; create and follow OpenAI batches.

    ``BatchClient("redis://host:6379/0")``; without ``settings``, the other
    settings (the key prefix) come from the environment.
    """

    def __init__(self, redis_url: str, settings: Settings | None = None) -> None:
        settings = settings or Settings()
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis = arq_redis(redis_url, settings)
        self.store = BatchStore(self.redis, self.keys, settings)

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- one request at a time -------------------------------------------------
    async def enqueue(self, url: str, body: Mapping[str, Any], *, job_id: str | None = None) -> BatchJob:
        """Enqueue one request for ``url`` (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``).

        Enqueueing an id that is already queued or running changes nothing and
        returns its handle, so a retried enqueue never runs a request twice.
        """
        body = dict(body)
        problem = line_problem("POST", url, body, None)
        if problem:
            raise ValueError(problem)
        job_id = job_id or uuid.uuid4().hex
        await self._enqueue(RunRequest(url, body), job_id)
        return BatchJob(job_id, self)

    async def enqueue_chat(self, *, model: str, messages: list[dict[str, Any]], job_id: str | None = None,
                           **params: Any) -> BatchJob:
        return await self.enqueue("/v1/chat/completions", {"model": model, "messages": messages, **params},
                                  job_id=job_id)

    async def enqueue_completion(self, *, model: str, prompt: str, job_id: str | None = None,
                                 **params: Any) -> BatchJob:
        return await self.enqueue("/v1/completions", {"model": model, "prompt": prompt, **params}, job_id=job_id)

    async def enqueue_embedding(self, *, model: str, input: str | list[str], job_id: str | None = None,
                                **params: Any) -> BatchJob:
        return await self.enqueue("/v1/embeddings", {"model": model, "input": input, **params}, job_id=job_id)

    async def enqueue_many(self, requests: Iterable[Mapping[str, Any]]) -> list[BatchJob]:
        """Enqueue many requests, each ``{"url", "body"}`` plus an optional ``job_id`` (OpenAI's line shape).

        Every request is checked before any is enqueued.
        """
        items = [dict(r) for r in requests]
        for i, r in enumerate(items):
            problem = line_problem("POST", str(r.get("url", "")), r.get("body") or {}, None)
            if problem or not isinstance(r.get("body"), dict):
                raise ValueError(f"request {i}: {problem or 'body must be an object'}")
        jobs = [BatchJob(str(r.get("job_id") or uuid.uuid4().hex), self) for r in items]
        await self._enqueue_all((RunRequest(r["url"], r["body"]), j.id) for r, j in zip(items, jobs))
        return jobs

    def job(self, job_id: str) -> BatchJob:
        return BatchJob(job_id, self)

    async def status(self, job_id: str) -> JobState:
        stored = await self.store.job_result(job_id)
        if stored is not None:
            if 200 <= stored["status_code"] < 300:
                return JobState.COMPLETED
            aborted = (stored["body"].get("error") or {}).get("code") == "cancelled"
            return JobState.ABORTED if aborted else JobState.FAILED
        state = await ArqJob(job_id, self.redis, _queue_name=self.keys.batch_queue()).status()
        return {JobStatus.deferred: JobState.DEFERRED, JobStatus.queued: JobState.QUEUED,
                JobStatus.in_progress: JobState.IN_PROGRESS}.get(state, JobState.NOT_FOUND)

    async def abort(self, job_id: str) -> bool:
        """Abort a job that has no result yet: True if it was aborted, False if it had already finished.

        The aborted result is stored first, so a run that finishes later cannot
        store another; then a runner running it stops it within a poll.
        """
        if await self.status(job_id) is JobState.NOT_FOUND:
            return False
        if not await self.store.store_job_result(job_id, 499, ABORTED):
            stored = await self.store.job_result(job_id)
            return stored is not None and (stored["body"].get("error") or {}).get("code") == "cancelled"
        await self.redis.zadd(abort_jobs_ss, {job_id: int(time.time() * 1000)})
        return True

    # --- OpenAI batches --------------------------------------------------------
    # ``tenant``: who asks. A tenant sees and acts on only what it owns; the default (no API keys) sees all.
    async def create_file(self, content: bytes, *, filename: str, purpose: str = "batch",
                          tenant: Tenant = ANONYMOUS) -> dict[str, Any]:
        return await self.store.create_file(content, filename=filename, purpose=purpose, owner=tenant)

    async def file(self, file_id: str, *, tenant: Tenant = ANONYMOUS) -> dict[str, Any]:
        return await self.store.file(file_id, tenant)

    async def file_content(self, file_id: str, *, tenant: Tenant = ANONYMOUS) -> bytes:
        return await self.store.file_content(file_id, tenant)

    async def delete_file(self, file_id: str, *, tenant: Tenant = ANONYMOUS) -> dict[str, Any]:
        return await self.store.delete_file(file_id, tenant)

    async def create_batch(self, *, input_file_id: str, endpoint: str, completion_window: str = "24h",
                           metadata: dict[str, str] | None = None, tenant: Tenant = ANONYMOUS) -> dict[str, Any]:
        """Record the batch (``validating``) and hand it to the runners, which validate and run it."""
        batch = await self.store.create_batch(input_file_id=input_file_id, endpoint=endpoint,
                                              completion_window=completion_window, metadata=metadata, owner=tenant)
        await self._enqueue(StartBatch(batch["id"]), f"{batch['id']}:start")
        return batch

    async def batch(self, batch_id: str, *, tenant: Tenant = ANONYMOUS) -> dict[str, Any]:
        return await self.store.batch(batch_id, tenant)

    async def batches(self, *, after: str | None = None, limit: int = 20,
                      tenant: Tenant = ANONYMOUS) -> tuple[list[dict[str, Any]], bool]:
        return await self.store.batches(after=after, limit=limit, tenant=tenant)

    async def cancel_batch(self, batch_id: str, *, tenant: Tenant = ANONYMOUS) -> dict[str, Any]:
        return await self.store.cancel(batch_id, tenant)

    async def runner_alive(self) -> bool:
        """Whether any batch runner reported in lately."""
        return bool(await self.redis.exists(self.keys.batch_runner_health()))

    # --- what runners enqueue --------------------------------------------------
    async def enqueue_requests(self, batch_id: str, requests: Iterable[Request], owner: str) -> None:
        """One job per request of a batch, run as its ``owner``; job ids are derived from the batch, so a repeat
        enqueues nothing new."""
        await self._enqueue_all(
            (RunLine(batch_id, r.index, r.custom_id, r.method, r.url, r.body, owner), f"{batch_id}:{r.index}")
            for r in requests)

    async def enqueue_finish(self, batch_id: str) -> None:
        await self._enqueue(FinishBatch(batch_id), f"{batch_id}:finish")

    async def _enqueue(self, task: BatchTask, job_id: str) -> None:
        await self.redis.enqueue_job(FUNCTION, task, _job_id=job_id)

    async def _enqueue_all(self, jobs: Iterable[tuple[BatchTask, str]], concurrency: int = 32) -> None:
        room = asyncio.Semaphore(concurrency)

        async def one(task: BatchTask, job_id: str) -> None:
            async with room:
                await self._enqueue(task, job_id)

        await asyncio.gather(*(one(*job) for job in jobs))


def arq_redis(redis_url: str, settings: Settings) -> ArqRedis:
    """arq's client on the batch queue's Redis (a plain one, or the master behind Sentinels), msgpack jobs."""
    return ArqRedis(connection_pool(redis_url), job_serializer=pack, job_deserializer=unpack,
                    default_queue_name=Keys(settings.key_prefix).batch_queue(),
                    expires_extra_ms=int(settings.batch_ttl * 1000))


def worker_options(redis_url: str, settings: Settings, make_handler: HandlerFactory, *,
                   owns_handler: bool = True) -> dict[str, Any]:
    """The keyword arguments of arq's ``Worker`` for a batch runner (what a ``WorkerSettings`` holds).

    There is no arq job timeout: a job may wait long for free workers, and
    the runner bounds its own requests. What expires instead is the job's
    claim (arq's in-progress key): the running job renews it every third of
    ``batch_lease``, so the jobs of a runner that died run again within about
    ``batch_lease`` seconds.
    """
    keys = Keys(settings.key_prefix)
    lease_ms = int(settings.batch_lease * 1000)
    handler_key = "redserve_handler"

    async def startup(ctx: dict[str, Any]) -> None:
        ctx[handler_key] = await make_handler(redis_url, settings)

    async def shutdown(ctx: dict[str, Any]) -> None:
        handler = ctx.pop(handler_key, None)
        if handler is not None and owns_handler:
            await handler.close()

    async def run(ctx: dict[str, Any], payload: Any) -> None:
        claim = in_progress_key_prefix + ctx["job_id"]
        renewing = asyncio.create_task(_renew(ctx["redis"], claim, lease_ms))
        try:
            await ctx[handler_key].handle(batch_task(payload), Attempt(ctx["job_id"], ctx["job_try"]))
        except Exception as exc:  # Redis hiccup, a bug: never drop the job, try it again shortly
            log.exception("batch job %s failed; it will run again", ctx["job_id"])
            raise Retry(defer=min(2 ** ctx["job_try"], 30)) from exc
        finally:
            renewing.cancel()

    return {
        "functions": [func(run, name=FUNCTION, max_tries=MAX_TRIES + 1)],
        "queue_name": keys.batch_queue(),
        "health_check_key": keys.batch_runner_health(),
        "health_check_interval": 5,
        "redis_pool": arq_redis(redis_url, settings),
        "on_startup": startup,
        "on_shutdown": shutdown,
        "max_jobs": settings.batch_concurrency,
        "job_timeout": None,
        "keep_result": 0,
        "poll_delay": POLL_DELAY,
        "allow_abort_jobs": True,
        "job_serializer": pack,
        "job_deserializer": unpack,
        "expires_extra_ms": int(settings.batch_ttl * 1000),
        "log_results": False,
    }


async def serve(redis_url: str, settings: Settings, make_handler: HandlerFactory, *,
                handle_signals: bool = True) -> None:
    """Run a batch runner until SIGTERM/SIGINT (or until cancelled); jobs it was running go back to the queue.

    Redis going away does not end it: arq's worker stops, and a new one
    starts with backoff once Redis answers again (the jobs it was running
    are claimed again when their lease lapses, and stored exactly once).
    """
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("arq.worker").setLevel(logging.WARNING)  # a line per job is debugging detail
    handler = await make_handler(redis_url, settings)  # one for every arq worker below: none leaks per outage

    async def the_handler(_url: str, _settings: Settings) -> Handler:
        return handler

    delay = 0.25
    try:
        while True:
            options = worker_options(redis_url, settings, the_handler, owns_handler=False)
            worker = Worker(**options, handle_signals=handle_signals)
            worker.in_progress_timeout_s = settings.batch_lease  # the first claim, before the job renews it
            try:
                await worker.async_run()
                return
            except asyncio.CancelledError:
                if not handle_signals:
                    raise
                return
            except _REDIS_LOST as exc:
                log.warning("batch runner lost Redis (%s); starting again in %.2fs", exc, delay)
            finally:
                try:
                    await asyncio.shield(worker.close())
                except Exception:  # Redis still away: close() stopped before closing its pool
                    with contextlib.suppress(Exception):
                        await worker.pool.aclose(close_connection_pool=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    finally:
        await asyncio.shield(handler.close())


async def _renew(redis: ArqRedis, key: str, lease_ms: int) -> None:
    while True:
        await redis.pexpire(key, lease_ms)
        await asyncio.sleep(lease_ms / 3000)
