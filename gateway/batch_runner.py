"""The batch runner: an arq worker that runs batch jobs through the same dispatcher and workers as everyone.

Run it as ``redserve batch-runner`` or ``arq gateway.batch_runner.WorkerSettings``.

Each request goes through the gateway application itself, called in process
(no socket): a batch line *is* the HTTP request it describes, so it is
validated, limited, dispatched and rendered exactly as if a client had sent
it, and its status code and body are what that client would have got. It
lives in ``gateway/`` for that reason: it is a gateway whose clients are
batch lines, over ``broker.batch``'s arq plumbing.

That gateway dispatches as a batch dispatcher: the dispatch script places a
job only where a worker has batch room (``batch_share`` of its slots), in the
same atomic step as the placement, and answers 429 ``no_batch_room``
otherwise. The runner adds patience (a 429, or a 503 ``no_worker``: wait and
send again) and stores the one result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from broker.batch import MAX_TRIES, Attempt, BatchClient, worker_options
from broker.batch_store import TERMINAL, NotFound, Request, line_problem, parse_requests
from broker.errors import ServeError
from broker.keys import Keys
from broker.protocol import BatchTask, FinishBatch, RunLine, RunRequest, StartBatch
from broker.settings import Settings
from broker.tenants import ANONYMOUS, Tenant
from gateway.app import create_app
from gateway.security import TENANT

log = logging.getLogger(__name__)

#: 503 codes that mean "not now" (no live worker, Redis was restarted): the request is sent again.
NOT_NOW = frozenset({"no_worker", "reply_lost", "redis_unavailable"})
#: Seconds between looks for batch room (it frees as soon as any job of the model ends).
NO_ROOM_POLL = 0.02
#: How the runner tells its in-process app which tenant a request runs as; only its own transport reads it.
_OWNER_HEADER = "x-redserve-batch-owner"
EXPIRED = "This request could not be executed before the batch's completion window expired."


class Runner:
    """What arq calls for each batch job (see ``broker.batch.Handler``)."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient, batches: BatchClient,
                 stack: contextlib.AsyncExitStack) -> None:
        self.settings = settings
        self.http = http
        self.batches = batches
        self.store = batches.store
        self._stack = stack

    @classmethod
    async def create(cls, redis_url: str, settings: Settings) -> Runner:
        """Start an in-process batch gateway (its lifespan opens the broker) and a client to call it."""
        settings = settings.model_copy(update={"dispatch_method": "shortest_queue"})
        app = create_app(redis_url, settings, batch=True)
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(app.router.lifespan_context(app))

        async def as_owner(scope: Any, receive: Any, send: Any) -> None:
            """Each request runs as its batch's owner (its limits, its requests): in process, no key needed."""
            owner = dict(scope["headers"]).get(_OWNER_HEADER.encode(), b"").decode()
            await app({**scope, TENANT: Tenant(owner) if owner else ANONYMOUS}, receive, send)

        http = await stack.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(as_owner, raise_app_exceptions=False), base_url="http://batch-runner",
            timeout=None))
        batches = await stack.enter_async_context(BatchClient(settings.required_batch_url(redis_url), settings))
        return cls(settings, http, batches, stack)

    async def close(self) -> None:
        await self._stack.aclose()

    async def handle(self, task: BatchTask, attempt: Attempt) -> None:
        match task:
            case RunLine():
                await self._batch_request(attempt, task)
            case RunRequest():
                await self._job(attempt, task)
            case StartBatch(batch):
                await self._start(batch)
            case FinishBatch(batch):
                with contextlib.suppress(NotFound):
                    await self.store.finalize(batch)

    # --- requests --------------------------------------------------------------
    async def answer(self, url: str, body: dict[str, Any], wanted: Callable[[], Awaitable[bool]],
                     owner: str = "") -> tuple[int, dict[str, Any]] | None:
        """Run one request through the batch gateway; (status code, response body).

        ``wanted`` is asked before each try: a job aborted (or a batch
        cancelled) while it waited is not sent at all (None). A 429 (no batch
        room, every worker full, a rate limit) or a 503 ``no_worker`` means
        "not now": the request waits and is sent again.
        ``owner``: the tenant it runs as (its batch's owner; "" for a Python API job).
        """
        delay, room_delay = 0.05, NO_ROOM_POLL
        while True:
            if not await wanted():
                return None
            response = await self.http.post(url, json=body, headers={_OWNER_HEADER: owner} if owner else None)
            try:
                content = response.json()
            except ValueError:
                content = ServeError(response.text or "Internal Server Error", status=response.status_code).body()
            code = (content.get("error") or {}).get("code") if isinstance(content, dict) else None
            if response.status_code != 429 and not (response.status_code == 503 and code in NOT_NOW):
                return response.status_code, content
            # No batch room frees within a job's time: look again soon, backing off to half a second; otherwise
            # (no worker, a rate limit) back off further.
            await asyncio.sleep(room_delay if code == "no_batch_room" else delay)
            room_delay, delay = min(room_delay * 2, 0.5), min(delay * 2, 2.0)

    async def _job(self, attempt: Attempt, p: RunRequest) -> None:
        """A Python API job: its result is stored once, under its job id."""
        async def unfinished() -> bool:  # False once an earlier attempt finished it, or it was aborted
            return await self.store.job_result(attempt.job_id) is None

        if not await unfinished():
            return
        if attempt.number > MAX_TRIES:
            await self.store.store_job_result(attempt.job_id, 500, _gave_up())
        elif answered := await self.answer(p.url, p.body, unfinished):
            await self.store.store_job_result(attempt.job_id, *answered)

    async def _batch_request(self, attempt: Attempt, p: RunLine) -> None:
        batch_id = p.batch
        request = Request(p.index, p.custom_id, p.method, p.url, p.body)

        async def runnable() -> bool:  # False once the batch is cancelled, expired or over
            status, expires_at = await self.store.state(batch_id)
            return status == "in_progress" and time.time() <= expires_at

        if await self.store.recorded(batch_id, request.index):  # an earlier attempt stored it
            await self._finish_if_settled(batch_id, await self.store.progress(batch_id))
            return
        answered = None
        if attempt.number > MAX_TRIES:
            answered = 500, _gave_up()
        elif await runnable():
            answered = await self.answer(request.url, request.body, runnable, p.owner)
        if answered is not None:
            counts = await self.store.record(batch_id, request, *answered)
        else:
            status, _ = await self.store.state(batch_id)
            if not status or status in TERMINAL:
                return
            if status == "cancelling":
                counts = await self.store.record_skipped(batch_id, request)
            else:
                counts = await self.store.record_error(batch_id, request, "batch_expired", EXPIRED)
        await self._finish_if_settled(batch_id, counts)

    async def _finish_if_settled(self, batch_id: str, counts: tuple[int, int]) -> None:
        settled, total = counts
        if total > 0 and settled >= total:
            await self.batches.enqueue_finish(batch_id)

    # --- batches ---------------------------------------------------------------
    async def _start(self, batch_id: str) -> None:
        """Validate the input file, then enqueue one job per request (a bad line is stored as an error at once).

        Safe to run again after a crash: jobs are enqueued under ids derived
        from the batch, and results already stored stay as they are.
        """
        try:
            batch = await self.store.batch(batch_id)
        except NotFound:
            return  # expired from Redis
        status = batch["status"]
        if status == "cancelling" and not batch["request_counts"]["total"]:  # cancelled before it began
            await self.store.transition(batch_id, ("cancelling",), "cancelled")
            return
        if status not in ("validating", "in_progress", "cancelling"):
            return
        requests = await self._validate(batch)
        if requests is None:
            return
        if status == "validating" and await self.store.transition(
                batch_id, ("validating",), "in_progress", total=str(len(requests))) == "cancelling":
            await self.store.transition(batch_id, ("cancelling",), "cancelled")
            return
        runnable = []
        for r in requests:
            problem = line_problem(r.method, r.url, r.body, batch["endpoint"])
            if problem:
                await self._finish_if_settled(batch_id, await self.store.record_error(
                    batch_id, r, "invalid_request", problem))
            else:
                runnable.append(r)
        await self.batches.enqueue_requests(batch_id, runnable, (await self.store.owner(batch_id)).id)

    async def _validate(self, batch: dict[str, Any]) -> list[Request] | None:
        """The batch's requests; None, and the batch failed with the reasons, if its file is missing or malformed."""
        try:
            content = await self.store.file_content(batch["input_file_id"])
        except NotFound as exc:
            errors = [{"code": "file_not_found", "message": exc.message, "param": "input_file_id", "line": None}]
        else:
            parsed = await asyncio.to_thread(parse_requests, content, self.settings.batch_max_requests)
            if not parsed.errors:
                return parsed.requests
            errors = parsed.errors
        await self.store.transition(batch["id"], ("validating",), "failed", errors=_json(errors))
        return None


def _gave_up() -> dict[str, Any]:
    return ServeError(f"The batch runners running this request died {MAX_TRIES} times; it was given up.",
                      code="runner_lost").body()


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


async def serve(redis_url: str, settings: Settings, *, handle_signals: bool = True) -> None:
    """``redserve batch-runner``: run until SIGTERM/SIGINT."""
    from broker import batch

    log.info("batch runner: queue %s, %d jobs at once, batch share %.2f, lease %gs",
             Keys(settings.key_prefix).batch_queue(), settings.batch_concurrency, settings.batch_share,
             settings.batch_lease)
    await batch.serve(settings.required_batch_url(redis_url), settings, _runners(redis_url),
                      handle_signals=handle_signals)


def _runners(redis_url: str) -> Callable[[str, Settings], Awaitable[Runner]]:
    """The handler factory arq's worker calls with the batch plane's URL: each runner serves through
    ``redis_url`` (the serving Redis, perhaps a cluster) while its queue lives on the batch plane."""
    async def runner(_batch_url: str, settings: Settings) -> Runner:
        return await Runner.create(redis_url, settings)

    return runner


def __getattr__(name: str) -> Any:
    """``WorkerSettings`` for ``arq gateway.batch_runner.WorkerSettings``, built on first use from the environment
    (REDIS_URL, REDSERVE_*), so importing this module reads nothing."""
    if name == "WorkerSettings":
        settings = Settings()
        redis_url = settings.resolved_redis_url()
        return type("WorkerSettings", (), worker_options(settings.required_batch_url(redis_url), settings,
                                                         _runners(redis_url)))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
