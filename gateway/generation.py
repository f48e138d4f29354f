"""Running one generation request through the broker and answering it, streamed or whole."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from broker.client import BrokerClient
from broker.errors import ServeError, UnknownModel, WorkerTimeout
from broker.ids import response_id
from broker.protocol import ChoiceEnd, Delta, Done, Event, Failure, JobKind, Params, TokenLogprob, ToolCall, Usage
from broker.replies import Idle, ReplyStream, Restarted
from broker.settings import Settings
from gateway import limits
from gateway.conversations import ConversationLog, Transcript
from gateway.disconnect import ClientGone, unless_disconnected
from gateway.metrics import GatewayMetrics, since
from gateway.moderation import texts_of
from gateway.render import Shape
from gateway.schemas import SamplingRequest
from gateway.security import RateLimiter, Reservation, tenant_of
from gateway.sse import PING, SSE, StreamFormat, encode, failure, opening, render
from gateway.sse import response as sse_response


async def generate(
    request: Request, broker: BrokerClient, body: SamplingRequest, kind: JobKind, *, prefix: str = ""
) -> Response:
    """Dispatch, wait for the first reply, then answer.

    Waiting for the first message before sending headers means an error the
    worker reports up front (a bad parameter, a prompt too long) becomes a
    proper HTTP status even for a streaming request.
    """
    settings = broker.settings
    limits.check(body, settings)
    if (moderator := request.app.state.moderator) is not None:
        await moderator.screen(texts_of(body.model_dump(include={"messages", "prompt"})),
                               "messages" if kind is JobKind.CHAT else "prompt")
    tenant = tenant_of(request)
    limiter: RateLimiter = request.app.state.limiter
    held = await reserve_tokens(request, body)
    metrics: GatewayMetrics = request.app.state.metrics
    started = time.perf_counter()
    shape = Shape(chat=kind is JobKind.CHAT, model=body.model)
    fmt = StreamFormat(shape, body.n, body.include_usage, prefix)
    meta = fmt.meta(kind) if body.resumable else None
    try:
        stream = await submit(request, broker, body.model, kind, body.job_params(), replay_meta=meta)
    except BaseException:
        await limiter.settle(held, 0)
        raise
    shape.id = response_id(kind, stream.rid)
    log: ConversationLog | None = request.app.state.conversations
    transcript = Transcript(body, kind, tenant.id) if log is not None else None
    try:
        try:
            first = await unless_disconnected(request, first_reply(stream))
        except WorkerTimeout as exc:
            if not body.stream:
                raise
            first = [exc.event()]  # streamed, as the client asked for a stream
        else:
            if first and isinstance(first[0], Failure):
                raise ServeError.from_event(first[0])
            metrics.child(metrics.ttft, body.model).observe(since(started))
    except ClientGone:
        await _release(broker, stream)
        await limiter.settle(held, 0)
        return Response(status_code=499)  # nobody reads it; the job was cancelled
    except BaseException:
        await _release(broker, stream)
        await limiter.settle(held, 0)  # nothing was generated
        raise

    account = _usage_hook(request, body.model, held,
                          (log, transcript, shape.id) if log is not None and transcript is not None else None)
    if body.stream:
        return _streamed(broker, stream, body.resumable, _sse(
            broker, stream, first, fmt, body.resumable, account, metrics.child(metrics.itl, body.model), transcript))
    try:
        whole = await unless_disconnected(request, _collect(stream, first, fmt.shape, prefix, transcript))
        await account(whole.usage)
        return JSONResponse(whole.body)
    except ClientGone:
        return Response(status_code=499)
    finally:
        await _release(broker, stream)


def _streamed(broker: BrokerClient, stream: ReplyStream, resumable: bool, events: AsyncIterator[bytes]) -> Response:
    """The SSE response that sends ``events``."""

    async def gone(_: object) -> None:
        # Let go of the stream the moment the client leaves: until it stops taking replies, anyio cannot deliver
        # the cancel to _sse (a task whose awaited queue keeps being fed is passed over, turn after turn), and
        # under load the worker went on for hundreds of ms for nobody.
        await _client_left(broker, stream, resumable)

    return sse_response(events, broker.settings.send_timeout, gone)  # _sse sends the keep-alive when idle


async def reserve_tokens(request: Request, body: SamplingRequest) -> Reservation | None:
    """Hold the request's tokens against its tenant's per-minute budget (a 429 when spent). A limited tenant's
    request without ``max_tokens`` gets ``tpm_default_max_tokens``: what the reservation holds is its cap."""
    settings: Settings = request.app.state.settings
    limiter: RateLimiter = request.app.state.limiter
    tenant = tenant_of(request)
    if limiter.tpm and tenant.limited and body.max_tokens is None:
        body.max_tokens = min(settings.tpm_default_max_tokens, settings.max_tokens_cap)
    return await limiter.reserve(tenant, limits.estimate_tokens(body))


async def submit(request: Request, broker: BrokerClient, model: str, kind: JobKind, params: Params,
                 **options: Any) -> ReplyStream:
    """Dispatch a job owned by the request's tenant. Once the dispatcher knows the model, it labels metrics;
    a name it does not know stays out of them (``unknown``), so untrusted input cannot grow the series."""
    try:
        stream = await broker.submit(model, kind, params, owner=tenant_of(request), **options)
    except UnknownModel:
        raise
    except ServeError:
        request.state.model = model
        raise
    request.state.model = model
    return stream


#: The events of one reply message, or the news that the job starts over elsewhere.
Events = Sequence[Event] | Restarted
Accountant = Callable[[Usage], Awaitable[None]]


def _usage_hook(request: Request, model: str, held: Reservation | None,
                logged: tuple[ConversationLog, Transcript, str] | None) -> Accountant:
    """What happens to a finished request's usage: metrics, settling its token reservation, and the
    conversation log (``logged``: the log, the transcript and the response id) when it is on.

    A request that never gets here (the client left, it was cancelled, it
    failed after its first token) keeps its whole reservation as its charge.
    """
    limiter: RateLimiter = request.app.state.limiter
    metrics: GatewayMetrics = request.app.state.metrics
    tokens = metrics.child(metrics.tokens, model)

    async def account(usage: Usage) -> None:
        tokens.inc(usage.completion_tokens)
        if logged is not None:
            log, transcript, rid = logged
            log.write(transcript, rid, usage)
        await limiter.settle(held, usage.prompt_tokens + usage.completion_tokens)

    return account


async def first_reply(stream: ReplyStream) -> Sequence[Event]:
    """The first message, past any restarts (a retry before anything was sent is invisible)."""
    while isinstance(events := await stream.next_events(), Restarted):
        pass
    return events


@dataclass
class Whole:
    """A finished non-streamed answer: its body, and the usage to account."""

    body: dict[str, Any]
    usage: Usage


async def _collect(stream: ReplyStream, first: Events, shape: Shape, prefix: str,
                   transcript: Transcript | None) -> Whole:
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    lps: dict[int, list[TokenLogprob]] = {}
    calls: dict[int, dict[int, dict[str, Any]]] = {}  # choice -> call index -> call
    events = first
    while True:
        _note(transcript, events)
        if isinstance(events, Restarted):  # the worker died, the job runs again elsewhere: start over
            texts, finish, lps, calls = {}, {}, {}, {}
            events = []
        for ev in events:
            match ev:
                case Delta(index=index, text=text, logprobs=logprobs):
                    texts.setdefault(index, [prefix] if prefix else []).append(text)
                    if logprobs is not None:
                        lps.setdefault(index, []).extend(logprobs)
                case ToolCall(index=index, call=call, arguments=arguments, id=id_, name=name):
                    made = calls.setdefault(index, {}).setdefault(call, {
                        "id": id_, "type": "function", "function": {"name": name, "arguments": ""}})
                    made["id"] = made["id"] or id_
                    made["function"]["name"] = made["function"]["name"] or name
                    made["function"]["arguments"] += arguments
                case ChoiceEnd(index=index, finish_reason=finish_reason):
                    finish[index] = finish_reason
                case Failure():
                    raise ServeError.from_event(ev)
                case Done(usage=usage):
                    joined = {i: "".join(p) for i, p in texts.items()}
                    listed = {i: [made[c] for c in sorted(made)] for i, made in calls.items()}
                    return Whole(shape.whole(joined, finish, usage, lps, listed), usage)
        events = await stream.next_events()


async def _sse(broker: BrokerClient, stream: ReplyStream, first: Events, fmt: StreamFormat,
               resumable: bool, account: Accountant, itl: Any, transcript: Transcript | None) -> AsyncIterator[bytes]:
    """The stream's SSE writes. Messages that arrived while the last write was going out are rendered into the
    next one: a client (or a gateway) that falls behind catches up in fewer, larger writes, and an idle one
    gets each message at once. (What waits in the queue may be a duplicate or come early after a gap, during a
    recovery: then what was rendered waits for the next message in order, or for the keep-alive. A slow
    client is still shed when ``stream_buffer`` messages wait while one write is blocked on it.) The opening
    chunks go out with the first message's events; a stream silent for ``keepalive`` seconds is sent a comment."""
    pending: list[SSE] = opening(fmt)
    try:
        events = first
        last = time.perf_counter()
        while True:
            _note(transcript, events)
            if not isinstance(events, Restarted):
                last = _observe(itl, stream, last)
                sse, ended = render(fmt, events, stream.attempt, stream.last_seq)
                stream.committed = stream.committed or any(isinstance(ev, (Delta, ToolCall)) for ev in events)
                pending += sse
                if ended:
                    yield encode(pending)
                    await _settle(events, account)
                    return
            if pending and not stream.arrived:
                yield encode(pending)
                pending = []
            got = await stream.next_events(broker.settings.keepalive)
            while isinstance(got, Idle):
                yield encode(pending) + PING  # what was held for a message that is late goes out now
                pending = []
                got = await stream.next_events(broker.settings.keepalive)
            events = got
    except ServeError as exc:
        yield encode(pending + failure(exc.body()))
    except (asyncio.CancelledError, GeneratorExit):
        await _client_left(broker, stream, resumable)
        raise
    finally:
        if stream.open:
            await _release(broker, stream)


async def _client_left(broker: BrokerClient, stream: ReplyStream, resumable: bool) -> None:
    """The client is gone. A resumable stream only stops listening (the client may come back for the rest: the
    job finishes into its replay log); any other is released, which cancels its job. A stream already let go
    (uvicorn also reports a disconnect once a response is complete) is left alone."""
    if not stream.open:
        return
    if resumable:
        stream.close()
    else:
        await _release(broker, stream)


def _observe(itl: Any, stream: ReplyStream, last: float) -> float:
    """Record the time since the stream's last message (none for its first); now, for the next one."""
    now = time.perf_counter()
    if stream.last_seq > 0:
        itl.observe(now - last)
    return now


async def _settle(events: Sequence[Event], account: Accountant) -> None:
    """Account a finished stream's usage; an error or a cancel keeps the whole reservation as its charge."""
    usage = next((ev.usage for ev in events if isinstance(ev, Done)), None)
    if usage is not None:
        await account(usage)


def _note(transcript: Transcript | None, events: Events) -> None:
    """Keep the conversation log's copy of the reply, when the log is on."""
    if transcript is not None:
        transcript.restart() if isinstance(events, Restarted) else transcript.feed(events)


async def _release(broker: BrokerClient, stream: ReplyStream) -> None:
    # Shielded: this runs while a disconnected client's task is being cancelled,
    # and the worker must still hear that nobody is listening any more.
    with anyio.CancelScope(shield=True):
        await broker.release(stream)
