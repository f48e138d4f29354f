"""BaseModelWorker: the whole worker protocol, so an engine implements only generation.

Life of a worker:

1. **register**: the heartbeat script writes the TTL'd record, creates the
   job stream's consumer group and reports the queue length per model;
2. **serve**: read up to ``max_concurrency`` jobs with XREADGROUP, run each as
   a task, publish its events on the job's reply channel, XACK + XDEL it and
   report the new queue length when it ends; cancellations arrive on the
   worker's control channel;
3. **drain** (SIGTERM): status ``draining`` (dispatch skips the worker), run
   what is already queued, deregister, exit 0.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from broker.connection import UNREACHABLE, connect, execute
from broker.errors import ServeError
from broker.keys import WORKER_GROUP, Keys
from broker.protocol import (
    Cancel,
    ChoiceEnd,
    Delta,
    Detokenize,
    Done,
    Embed,
    Embeddings,
    Event,
    Failure,
    Generate,
    Job,
    JobKind,
    Reply,
    Resend,
    Text,
    TokenCount,
    TokenLogprob,
    ToolCall,
    Usage,
    as_str,
    control,
)
from broker.pubsub import subscribe_forever
from broker.registry import Registry, WorkerRecord
from broker.scripts import Scripts
from broker.settings import Settings
from workers.chat_templates import chat_template
from workers.errors import JobError
from workers.metrics import serve_metrics
from workers.outbox import Outbox, OutboxOverflow, ReplayLog
from workers.params import fitted, in_vocabulary, l2_normalised
from workers.prompts import prompt_ids
from workers.publish import Orphaned, ReplyPublisher
from workers.tools import PARSERS
from workers.tools.calls import constraint, tool_events

log = logging.getLogger(__name__)
#: What a failed read of a job stream can be: Redis away, or NOGROUP (Redis lost the stream; the next heartbeat
#: recreates it).
_READ_FAILURES: tuple[type[BaseException], ...] = (ResponseError, *UNREACHABLE)

CANCELLED = ServeError("The request was cancelled.", status=499, code="cancelled").event()
ORPHANED = ServeError("The worker stopped this request: no gateway heard its replies for orphan_grace seconds.",
                      status=503, code="reply_lost").event()
OVERFLOWED = ServeError("Redis was unreachable so long that this request's waiting replies passed its share of the "
                        "worker's outbox_max_bytes; it was stopped.", status=503, code="reply_lost").event()


#: Seconds a finished job waits to be retired (finish.lua) before it frees its slot anyway.
FINISH_WAIT = 2.0
#: A job read at most this many seconds after it was queued (see ``_read_stream``) skips the check that its
#: gateway still listens: that gateway was alive then, and one that died since is caught by its first unheard
#: replies (``orphan_grace``). It spares a round trip to Redis on a request's way to its first token. An empty
#: read returns after its 250 ms block plus up to a server tick (100 ms at Redis's default hz): a second covers
#: a job that arrives at any moment of an idle worker's read.
FRESH = 1.0

class BaseModelWorker(abc.ABC):
    #: The name ``redserve worker --engine`` knows this engine by.
    engine: ClassVar[str]
    #: The optional features (``Generate.asks``) the engine honours; a job asking for another is a 400.
    #: With ``structured`` and ``tools``, this base makes tool calls of the engine's text (``workers.tools``).
    features: ClassVar[frozenset[str]] = frozenset()
    #: The engine forwards the request to an upstream API that does it all (tool calls, echo): the base relays.
    upstream: ClassVar[bool] = False

    def __init__(self, redis_url: str, settings: Settings, models: list[str], *, worker_id: str | None = None) -> None:
        """``settings.redis_url`` is not read: the caller resolved it into ``redis_url``."""
        if not models:
            raise ValueError("a worker serves at least one model")
        if settings.tool_parser not in PARSERS:
            raise ValueError(f"unknown tool_parser {settings.tool_parser!r}; known: {', '.join(PARSERS)}")
        self.tool_parser = PARSERS[settings.tool_parser]
        #: ``--chat-template``, read now: a wrong name or path stops the worker before it loads a model.
        self.chat_template = chat_template(settings.chat_template) if settings.chat_template else None
        self.redis_url = redis_url
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.record = WorkerRecord(
            id=worker_id or f"{self.engine}-{uuid.uuid4().hex[:8]}",
            models=list(models),
            engine=self.engine,
            speed=settings.speed,
            max_concurrency=settings.max_concurrency,
            max_queue=settings.max_queue or 4 * settings.max_concurrency,
        )
        #: The engine's Hugging Face tokenizer, once ``setup`` loaded it (tokenize, detokenize, chat templates).
        self.tokenizer: Any = None
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.jobs: dict[str, Job] = {}
        self._background: set[asyncio.Task[None]] = set()
        #: The publisher of each running job, and of each finished one for ``resend_window`` (with when it
        #: ended): a gateway that missed messages asks for them again by request id.
        self.publishers: dict[str, ReplyPublisher] = {}
        self._ended: dict[str, float] = {}
        #: Jobs that ended but could not be retired (Redis was away), as (model, entry id): retired once it is back.
        self._unretired: set[tuple[str, str]] = set()
        self._draining = asyncio.Event()
        self._registered = asyncio.Event()
        self._slot_freed = asyncio.Event()
        #: Jobs read while every slot was taken (a worker of several models reads each one's stream apart):
        #: they start, in order, as slots free.
        self._held: list[Job] = []
        #: Request ids cancelled before the job was read, with when (monotonic).
        self._cancelled: dict[str, float] = {}
        self.metrics_port: int | None = None
        self._text: Redis | None = None
        self._raw: Redis | None = None
        self.outbox: Outbox | None = None

    # --- what an engine implements ------------------------------------------
    async def setup(self) -> None:  # noqa: B027 - an optional hook: engines without a model keep it
        """Load the model (off the event loop). Called once before registering."""

    async def teardown(self) -> None:  # noqa: B027 - an optional hook, like setup
        """Release what ``setup`` took (engine threads, HTTP clients); runs however ``serve`` ends."""

    @abc.abstractmethod
    def generate(self, job: Job) -> AsyncIterator[Event]:
        """Yield ``Delta`` and ``ChoiceEnd`` events and finish with ``Done``.

        Raise ``JobError`` for a bad request. Compute must not block the event
        loop: run it in a thread or process and await it.
        """

    async def embed(self, job: Job) -> Embeddings:
        """Embed ``job.params.input``. Engines without embeddings keep this."""
        raise JobError(f"The model `{job.model}` does not support embeddings.", code="unsupported")

    # --- what a Hugging Face tokenizer gives every engine that has one (``tokenizer_of``) -------
    def tokenizer_of(self, model: str) -> Any:
        """The tokenizer of one served model (None: the engine has none); a worker of several models overrides."""
        return self.tokenizer

    async def tokenize(self, job: Job) -> tuple[int, list[int] | None]:
        """Count a prompt's tokens: ``(count, ids)``; ``ids`` None when the engine has no real ids."""
        tokenizer = self.tokenizer_of(job.model)
        if tokenizer is None:
            raise JobError(f"The model `{job.model}` cannot tokenize.", code="unsupported", param="model")
        ids = await asyncio.to_thread(prompt_ids, tokenizer, job)
        return len(ids), ids

    def token_strings(self, model: str, ids: list[int]) -> list[str] | None:
        """Each token's text, for ``/tokenize``; None when the engine has no tokenizer."""
        tokenizer = self.tokenizer_of(model)
        return None if tokenizer is None else [tokenizer.decode([i]) for i in ids]

    async def detokenize(self, job: Job) -> str:
        """Token ids back to text."""
        assert isinstance(job.params, Detokenize)
        tokenizer = self.tokenizer_of(job.model)
        if tokenizer is None:
            raise JobError(f"The model `{job.model}` cannot detokenize.", code="unsupported", param="model")
        in_vocabulary(job.params.tokens, len(tokenizer), "tokens")
        text: str = await asyncio.to_thread(tokenizer.decode, job.params.tokens)
        return text

    # --- lifecycle -------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.record.id

    async def serve(self) -> None:
        """Run until drained. Returns normally after a clean drain."""
        await self.setup()
        if self.settings.chat_template:
            for model in self.record.models:
                if (tokenizer := self.tokenizer_of(model)) is not None:
                    tokenizer.chat_template = self.chat_template
        try:
            await self._serve()
        finally:
            await self.teardown()

    async def _serve(self) -> None:
        self._text = connect(self.redis_url, decode=True)
        self._raw = connect(self.redis_url, decode=False)
        self.registry = Registry(self._text, self.keys)
        self.scripts = Scripts.register(self._raw)
        self.outbox = Outbox(self._raw, self.settings.outbox_max_bytes)
        if self.settings.metrics_port is not None:
            self.metrics_port = serve_metrics(self, self.settings.host, self.settings.metrics_port)
            log.info("worker %s metrics on http://%s:%d/metrics", self.id, self.settings.host, self.metrics_port)
        try:
            self.record.queue = await self.registry.heartbeat(self.record, self.settings.worker_ttl)
            self._registered.set()
            log.info("worker %s serving %s", self.id, ",".join(self.record.models))
            async with asyncio.TaskGroup() as tg:
                beat = tg.create_task(self._heartbeat_loop())
                control = tg.create_task(self._control_loop())
                outbox = tg.create_task(self.outbox.run())
                await self._read_loop()
                for task in (beat, control, outbox):
                    task.cancel()
            await self.registry.deregister(self.record)
        finally:
            await self._text.aclose()
            await self._raw.aclose()

    def drain(self) -> None:
        """Stop taking jobs; ``serve`` returns once the queued ones are done."""
        self._draining.set()

    async def wait_registered(self) -> None:
        await self._registered.wait()

    # --- loops -----------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                self.record.queue = await self.registry.heartbeat(self.record, self.settings.worker_ttl)
                await self._reconcile()
            except UNREACHABLE as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:  # a refused command (OOM, say): the worker must go on beating
                log.exception("heartbeat failed")
            _forget_older_than(self._ended, self.settings.resend_window, also=self.publishers)

    async def _reconcile(self) -> None:
        """Make the stream match the truth after Redis was away: no job counted that nobody runs.

        Jobs that ended while Redis was unreachable are retired now. A pending
        entry of ours that no task runs (a ghost: Redis came back from its AOF
        with an entry we had already retired, or had delivered just before it
        died) is run again if it is still wanted, else retired: its queue slot
        is never lost.
        """
        for model, entry_id in list(self._unretired):
            self.record.queue = await self.registry.finish(self.record, entry_id, model)
            self._unretired.discard((model, entry_id))
        running = {t.entry_id for t in self.jobs.values()} | {t.entry_id for t in self._held}
        idle_ms = int(self.settings.heartbeat_interval * 2000)
        for model in self.record.models:
            for entry_id, fields in await self._ghosts(model, idle_ms, running):
                if fields is None:  # acked meanwhile, or deleted
                    continue
                job = Job.from_fields(entry_id, fields)
                if job.request_id in self._ended or job.request_id in self.tasks:
                    self.record.queue = await self.registry.finish(self.record, entry_id, job.model)
                else:
                    log.info("job %s found pending with no task after Redis came back: running it", job.request_id)
                    self._start(job)

    async def _control_loop(self) -> None:
        assert self._raw is not None

        def down(exc: BaseException, first: bool) -> None:
            if first:
                log.warning("control channel lost (%s); resubscribing", exc)

        await subscribe_forever(self._raw, self.keys.worker_control(self.id), self._on_control, on_down=down)

    def _on_control(self, data: bytes) -> None:
        try:
            msg = control(data)
        except ValueError:  # msgspec's DecodeError and ValidationError: not ours to act on
            log.warning("undecodable control message dropped")
            return
        match msg:
            case Resend(rid, from_seq, attempt, to):
                self._in_background(self._resend(rid, from_seq, attempt, to))
            case Cancel(rid):
                task = self.tasks.get(rid)
                if task is not None:
                    task.cancel()
                else:  # still waiting in our stream: remember, so it is skipped when read
                    self._cancelled[rid] = time.monotonic()
                    _forget_older_than(self._cancelled, self.settings.reply_timeout * 2)

    async def _read_loop(self) -> None:
        """Read jobs, one reader per model (each model's stream lives in its own slot on a cluster); when
        draining, go on running what is queued and stop once every stream is empty (or at ``drain_timeout``)."""
        assert self._raw is not None
        readers = [asyncio.create_task(self._read_stream(m), name=f"read-{m}") for m in self.record.models]
        try:
            draining = asyncio.create_task(self._draining.wait())
            await asyncio.wait([draining, *readers], return_when=asyncio.FIRST_COMPLETED)
            for reader in readers:  # a reader only ends by failing: the worker must not go on deaf to a model
                if reader.done():
                    draining.cancel()
                    reader.result()
            deadline = time.monotonic() + self.settings.drain_timeout
            self.record.status = "draining"
            await self.registry.heartbeat(self.record, self.settings.worker_ttl)
            while time.monotonic() < deadline and (self.tasks or self._held or await self._queued_anywhere()):
                await asyncio.sleep(0.1)
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        self._held.clear()  # never started: left to the drain timeout, as jobs still in the stream are
        if self.tasks:
            log.warning("drain timeout: cancelling %d jobs", len(self.tasks))
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _queued_anywhere(self) -> bool:
        """Whether any of this worker's streams still holds a job."""
        assert self._raw is not None
        lengths = await asyncio.gather(*(self._raw.xlen(self.keys.jobs(m, self.id)) for m in self.record.models))
        return any(lengths)

    async def _read_stream(self, model: str) -> None:
        """Read ``model``'s jobs while slots are free. A worker of one model reads as many as are free at once;
        with several, each reader takes one at a time, and a job read while another reader filled the last
        slot waits here, already ours, for the next (so ``max_concurrency`` always holds)."""
        assert self._raw is not None
        stream = self.keys.jobs(model, self.id)
        # When a read returned fewer jobs than it asked for, the stream held no more then: every job a later read
        # returns was queued after that read was sent. So while the reads keep draining the stream, a job's age
        # is at most the time since the last such read was sent (None: unknown, after a full read or a failure).
        drained_at: float | None = None
        while True:
            free = self.settings.max_concurrency - len(self.tasks) - len(self._held)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            count = free if len(self.record.models) == 1 else 1
            asked = time.monotonic()
            try:
                entries = await self._raw.xreadgroup(WORKER_GROUP, self.id, {stream: ">"}, block=250, count=count)
            except Exception as exc:  # a reader that died would leave its jobs unread: read on after a pause
                if isinstance(exc, _READ_FAILURES):  # NOGROUP after Redis lost our stream: the heartbeat remakes it
                    log.warning("reading jobs of %s failed: %s", model, exc)
                else:  # a client error mid-failover, say
                    log.exception("reading jobs of %s failed unexpectedly; reading on", model)
                drained_at = None
                await asyncio.sleep(0.5)
                continue
            batch = [e for _, part in entries or [] for e in part]
            fresh = drained_at is not None and time.monotonic() - drained_at <= FRESH
            drained_at = asked if len(batch) < count else None
            for eid, fields in batch:
                job = Job.from_fields(eid.decode(), fields)
                if len(self.tasks) < self.settings.max_concurrency:
                    self._start(job, fresh=fresh)
                else:
                    self._held.append(job)

    def _start(self, job: Job, *, fresh: bool = False) -> None:
        """Run ``job``; ``fresh``: it was queued at most ``FRESH`` seconds ago."""
        task = asyncio.create_task(self._run_job(job, fresh), name=f"job-{job.request_id}")
        self.tasks[job.request_id] = task
        self.jobs[job.request_id] = job
        task.add_done_callback(lambda _t: self._job_done(job.request_id))

    def _job_done(self, request_id: str) -> None:
        self.tasks.pop(request_id, None)
        self.jobs.pop(request_id, None)
        if self._held:
            self._start(self._held.pop(0))
        self._slot_freed.set()

    def _in_background(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resend(self, rid: str, from_seq: int, attempt: int, reply_to: str) -> None:
        """A gateway missed replies of ``rid`` from ``from_seq`` on (its subscription broke): send them again.

        A request this worker neither runs, ran lately nor holds in its stream
        was lost with Redis (its job never reached us): the gateway hears
        ``lost`` and retries it, or fails it cleanly if the client saw part.
        """
        publisher = self.publishers.get(rid)
        try:
            if publisher is not None and publisher.attempt == attempt:
                await publisher.resend(from_seq)
            elif publisher is None and reply_to and not await self._queued(rid):
                assert self.outbox is not None  # control messages arrive only while serving
                await self.outbox.publish(reply_to, Reply.worker_lost(rid, attempt).encode())
        except Exception as exc:  # Redis away again: the gateway asks again when it resubscribes
            log.info("resend of %s failed: %s", rid, exc)

    async def _queued(self, rid: str) -> bool:
        """Whether ``rid`` still waits in one of this worker's streams."""
        assert self._raw is not None
        if any(job.request_id == rid for job in self._held):
            return True
        for model in self.record.models:
            for _, fields in await self._raw.xrange(self.keys.jobs(model, self.id)):
                if Job.request_id_of(fields) == rid:
                    return True
        return False

    async def _ghosts(self, model: str, idle_ms: int,
                      running: set[str]) -> list[tuple[str, dict[bytes, bytes] | None]]:
        """Entries of ``model`` delivered to this worker, unacknowledged for ``idle_ms``, that no task of ours
        runs (nor holds for a slot)."""
        assert self._raw is not None
        stream = self.keys.jobs(model, self.id)
        try:
            rows = await self._raw.xpending_range(stream, WORKER_GROUP, min="-", max="+", count=1000,
                                                  consumername=self.id, idle=idle_ms)
        except ResponseError:  # NOGROUP: the stream is gone (Redis came back empty); the heartbeat remade it
            return []
        ids = [as_str(r["message_id"]) for r in rows]
        ids = [i for i in ids if i not in running]
        if not ids:
            return []
        async with self._raw.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xrange(stream, entry_id, entry_id)
            found = await execute(pipe)
        return [(i, rows[0][1] if rows else None) for i, rows in zip(ids, found)]

    # --- one job ---------------------------------------------------------------
    async def _run_job(self, job: Job, fresh: bool = False) -> None:
        assert self._raw is not None and self.outbox is not None
        replay = ReplayLog(self.scripts.emit, self.keys.replay(job.request_id), job.replay_ms) \
            if job.replay_ms else None
        publisher = ReplyPublisher(self._raw, self.outbox, job.reply_to, job.request_id, job.attempt, replay,
                                   grace=self.settings.orphan_grace,
                                   max_waiting=self.settings.outbox_max_bytes // self.settings.max_concurrency)
        self.publishers[job.request_id] = publisher
        self._ended.pop(job.request_id, None)
        try:
            if job.expired():
                log.info("job %s dropped: deadline passed before it started", job.request_id)
                return
            if self._cancelled.pop(job.request_id, None) is not None:
                log.info("job %s dropped: cancelled while it waited", job.request_id)
                await publisher.send([CANCELLED])
                return
            if not job.replay_ms and not fresh and not await publisher.listened():
                log.info("job %s dropped: its gateway is gone", job.request_id)
                return
            await publisher.pump(self._events(job))
        except asyncio.CancelledError:
            # Cancelled by the client (or drain timeout): say so in-band, then retire the job.
            with contextlib.suppress(Exception):
                await publisher.send([CANCELLED])
        except Orphaned:
            log.info("job %s stopped: nobody listens for it any more", job.request_id)
            publisher.keep(ORPHANED)  # a gateway that comes back and asks hears why the stream ended
        except OutboxOverflow:
            log.warning("job %s failed: its replies passed outbox_max_bytes while Redis was away", job.request_id)
            with contextlib.suppress(Exception):
                await publisher.send([OVERFLOWED])
        except Exception:
            log.exception("job %s failed", job.request_id)
        finally:
            self.record.jobs_done += 1
            self._ended[job.request_id] = time.monotonic()
            try:
                # Bounded: the job's slot is held until this returns, and a client's own retries (a cluster
                # refreshing its slot table through a failover) can outlast the failover itself. finish.lua is
                # idempotent, so a job not retired in time is retired by the next heartbeat.
                async with asyncio.timeout(FINISH_WAIT):
                    self.record.queue = await self.registry.finish(self.record, job.entry_id, job.model)
            except Exception as exc:  # Redis away: retired by the first heartbeat that reaches it
                log.info("job %s ended while Redis was unreachable (%r); retired later", job.request_id, exc)
                self._unretired.add((job.model, job.entry_id))

    async def _events(self, job: Job) -> AsyncIterator[Event]:
        """The engine's events, with errors turned into a terminal error event."""
        try:
            if job.invalid:
                raise JobError(f"This worker cannot take the job's parameters: {job.invalid}.",
                               param=_invalid_param(job.invalid), code="unsupported_parameter")
            if job.kind is JobKind.EMBEDDING:
                yield self._shortened(job, await self.embed(job))
                return
            if job.kind is JobKind.TOKENIZE:
                count, ids = await self.tokenize(job)
                strs = None if ids is None else await asyncio.to_thread(self.token_strings, job.model, ids)
                yield TokenCount(count, ids, self.record.context_of(job.model), strs)
                return
            if job.kind is JobKind.DETOKENIZE:
                yield Text(await self.detokenize(job))
                return
            assert isinstance(job.params, Generate)
            if missing := sorted(job.params.asks() - self.features):
                raise JobError(f"The model `{job.model}` does not support `{missing[0]}`.", param=missing[0],
                               code="unsupported_parameter")
            events = self._fanned(job) if job.params.prompts else self._generation(job)
            async for ev in events:
                yield ev
        except ServeError as exc:
            yield exc.event()
        except Exception as exc:  # an engine bug must still end the stream
            log.exception("engine failed on job %s", job.request_id)
            yield ServeError(f"The worker failed: {type(exc).__name__}: {exc}").event()


    def matryoshka(self, model: str) -> bool:
        """Whether the model's vectors may be cut short (trained Matryoshka-style); engines that know say so."""
        return False

    def _shortened(self, job: Job, answer: Embeddings) -> Embeddings:
        """``dimensions``: the vectors' first components, renormalised, for a model trained that way; else a 400."""
        dims = job.params.dimensions if isinstance(job.params, Embed) else None
        if dims is None or self.upstream:
            return answer
        if not self.matryoshka(job.model):
            raise JobError(f"The model `{job.model}` does not support `dimensions` (it is not a Matryoshka "
                           "model: its vectors cannot be cut short).", param="dimensions",
                           code="unsupported_parameter")
        width = len(answer.vectors[0]) if answer.vectors else 0
        if dims > width:
            raise JobError(f"`dimensions` is {dims}, more than the model's {width}.", param="dimensions")
        return Embeddings([l2_normalised(v[:dims]) for v in answer.vectors], answer.usage)

    def _generation(self, job: Job) -> AsyncIterator[Event]:
        """One prompt's events: its echo first, then the engine's, with tool calls made of its text."""
        params = job.params
        assert isinstance(params, Generate)
        if params.echo and not self.upstream:
            return self._echoed(job)
        job, calls = self._with_tools(job)
        events = self._counted(self.generate(job))
        if calls:
            events = tool_events(events, params, self.tool_parser)
        return events

    async def _echoed(self, job: Job) -> AsyncIterator[Event]:
        """``echo``: each choice starts with the prompt (and, asked for logprobs, the prompt tokens'); with
        ``max_tokens: 0`` that is all (what evaluation harnesses score a continuation with)."""
        params = job.params
        assert isinstance(params, Generate)
        text = self.prompt_text(job.model, params)
        count, _ = await self.tokenize(job)
        if context := self.record.context_of(job.model):  # all a stream could fail on is checked before its first byte
            if params.max_tokens:
                fitted(params, job.kind, count, context)
            elif count > context:
                raise JobError(f"This model's maximum context length is {context} tokens; the "
                               f"prompt has {count}.", param="prompt", code="context_length_exceeded")
        scored = await self.prompt_logprobs(job, params.logprobs) if params.logprobs is not None else None
        for i in range(params.n):
            yield Delta(i, text, 0, scored)
        if params.max_tokens == 0:
            for i in range(params.n):
                yield ChoiceEnd(i, "length")
            yield Done(Usage(count, 0))
            return
        async for ev in self._generation(dataclasses.replace(job, params=msgspec.structs.replace(params, echo=False))):
            yield ev

    async def _fanned(self, job: Job) -> AsyncIterator[Event]:
        """Several prompts in one job: each runs as its own generation, at once; prompt ``k``'s choice ``i`` is
        choice ``k * n + i``, and usage is the sum. The first failure ends them all."""
        params = job.params
        assert isinstance(params, Generate) and params.prompts
        queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()

        async def run(k: int, prompt: str | list[int]) -> None:
            one = dataclasses.replace(job, request_id=f"{job.request_id}-{k}",  # an engine's own id for each
                                      params=msgspec.structs.replace(params, prompt=prompt, prompts=None))
            try:
                async for ev in self._generation(one):
                    await queue.put((k, ev))
            except ServeError as exc:
                await queue.put((k, exc.event()))
            except Exception as exc:  # an engine bug ends this request, not the worker
                log.exception("engine failed on prompt %d of job %s", k, job.request_id)
                await queue.put((k, ServeError(f"The worker failed: {type(exc).__name__}: {exc}").event()))
            finally:
                await queue.put((k, None))

        tasks = [asyncio.create_task(run(k, p)) for k, p in enumerate(params.prompts)]
        prompt_tokens = completion_tokens = 0
        try:
            running = len(tasks)
            while running:
                k, ev = await queue.get()
                match ev:
                    case None:
                        running -= 1
                    case Done(usage=usage):
                        prompt_tokens += usage.prompt_tokens
                        completion_tokens += usage.completion_tokens
                    case Failure():
                        yield ev
                        return
                    case Delta() | ChoiceEnd() | ToolCall():
                        yield msgspec.structs.replace(ev, index=k * params.n + ev.index)
            yield Done(Usage(prompt_tokens, completion_tokens))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def prompt_text(self, model: str, params: Generate) -> str:
        """A completion prompt as text (token ids through the tokenizer)."""
        if isinstance(params.prompt, str):
            return params.prompt
        tokenizer = self.tokenizer_of(model)
        if tokenizer is None:
            raise JobError("This engine has no tokenizer to read a token-id prompt back as text.", param="prompt",
                           code="unsupported_parameter")
        text: str = tokenizer.decode(params.prompt or [])
        return text

    async def prompt_logprobs(self, job: Job, top: int) -> list[TokenLogprob]:
        """The prompt tokens' logprobs (``echo`` with ``logprobs``), the first one None. Engines that score
        prompts implement it."""
        raise JobError(f"The model `{job.model}` cannot report prompt logprobs (echo with logprobs).",
                       param="echo", code="unsupported_parameter")

    async def _counted(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        async for ev in events:
            if isinstance(ev, Delta):
                self.record.tokens_out += ev.tokens
            yield ev

    def _with_tools(self, job: Job) -> tuple[Job, bool]:
        """The job as the engine runs it, and whether its text becomes tool calls here.

        A forced choice (``required``, a named function) constrains the output
        to valid calls, which needs the engine's structured outputs.
        """
        params = job.params
        assert isinstance(params, Generate)
        if not params.tools or params.tool_choice == "none" or self.upstream:
            return job, False
        forced = constraint(params)
        if forced is None and self.tool_parser.needs_special_tokens:  # its markers must reach the parser
            job = dataclasses.replace(job, params=msgspec.structs.replace(params, skip_special_tokens=False))
        if forced is not None:
            if "structured" not in self.features:
                raise JobError(f"The model `{job.model}` cannot force a tool choice (it has no constrained "
                               "decoding); use tool_choice auto.", param="tool_choice", code="unsupported_parameter")
            if params.structured is not None:
                raise JobError("A forced tool_choice and response_format cannot be combined.",
                               param="response_format")
            job = dataclasses.replace(job, params=msgspec.structs.replace(params, structured=forced))
        return job, True


def lora_adapters(specs: list[str]) -> dict[str, str]:
    """``--lora NAME=PATH`` (repeatable) as {name: path}; each adapter is served as a model of its own."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora wants NAME=PATH, got {spec!r}")
        adapters[name] = os.path.expanduser(path)
    return adapters


def _invalid_param(problem: str) -> str | None:
    """The parameter a decoding problem names: msgspec says ``unknown field `x``` or ``at `$.x[0]```."""
    found = re.search(r"unknown field `([^`]+)`", problem) or re.search(r"at `\$\.(\w+)", problem)
    return found.group(1) if found else None


def _forget_older_than(marks: dict[str, float], age: float, also: dict[str, Any] | None = None) -> None:
    cutoff = time.monotonic() - age
    for key in [k for k, t in marks.items() if t < cutoff]:
        del marks[key]
        if also is not None:
            also.pop(key, None)
