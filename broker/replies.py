"""Token replies: one pub/sub connection per gateway process carries all its requests.

The router SUBSCRIBEs once to the process's reply channel and demultiplexes
messages by request id into per-request queues. A request registers its
queue *before* it is dispatched, so no reply can arrive unseen.

The router never blocks on a request: a client too slow to keep up fills its
own bounded queue and is shed, so it can neither grow this process's memory
nor make Redis drop the shared connection for an overfull output buffer.

A lost subscription (Redis restarted, the connection was cut) fails nobody:
the router subscribes again and asks the worker of every open stream to send
again what it may have missed (``on_resubscribed``). A stream that sees a
gap in its sequence numbers holds what came early and asks for the missing
messages (``on_gap``); it never guesses, and gives up only at its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, overload

from redis.asyncio import Redis

from broker.errors import ServeError, WorkerLost, WorkerTimeout
from broker.keys import Keys
from broker.protocol import Event, Reply
from broker.pubsub import subscribe_forever

if TYPE_CHECKING:
    from broker.protocol import Job

log = logging.getLogger(__name__)

#: Seconds between requests for a resend while a stream waits for a missing message.
GAP_RETRY = 1.0


class Restarted:
    """What ``ReplyStream.next_events`` returns after re-dispatching a job whose worker died unseen: a signal
    between the stream and its consumer, never a message on the wire."""


#: The one ``Restarted`` value (compare with ``is``).
RESTART = Restarted()


class Idle:
    """What ``ReplyStream.next_events(idle=...)`` returns when no message came for that long."""


#: The one ``Idle`` value (compare with ``is``).
IDLE = Idle()


class SlowClient(ServeError):
    status, type, code = 503, "service_unavailable", "client_too_slow"


class ReplyStream:
    """The replies of one request, in order, as an async iterator of events."""

    def __init__(self, router: ReplyRouter, rid: str, timeout: float, buffer: int) -> None:
        self.router = router
        self.rid = rid
        self.timeout = timeout
        self.queue: asyncio.Queue[Reply | BaseException] = asyncio.Queue(maxsize=buffer)
        self.next_seq = 0
        #: The seq of the message ``next_events`` returned last (SSE event ids are built from it).
        self.last_seq = -1
        self.finished = False
        #: Set by whoever dispatched the request.
        self.job: Job | None = None
        self.worker_id: str | None = None
        #: The consumer sets this once part of the reply reached the client: from then on a
        #: lost worker is an error, not a transparent retry.
        self.committed = False
        #: Re-dispatches the job after its worker died (set by the client that dispatched it).
        self.retry: Callable[[ReplyStream], Awaitable[None]] | None = None
        self.failed: ServeError | None = None
        #: Messages that arrived ahead of a gap, by seq, until the gap is filled.
        self.ahead: dict[int, Reply] = {}
        #: Set when the subscription came back: messages may have been missed, though none came early.
        self.unsure = False
        #: When (loop time) this stream last asked its worker to resend.
        self.asked_at = 0.0
        #: When (loop time) waiting for the next message ends in WorkerTimeout; None while none is awaited.
        self._give_up: float | None = None

    @property
    def arrived(self) -> bool:
        """Whether a message is waiting to be read (``next_events`` would most likely not wait)."""
        return not self.queue.empty()

    @property
    def attempt(self) -> int:
        return self.job.attempt if self.job else 0

    @overload
    async def next_events(self) -> list[Event] | Restarted: ...

    @overload
    async def next_events(self, idle: float) -> list[Event] | Restarted | Idle: ...

    async def next_events(self, idle: float = 0.0) -> list[Event] | Restarted | Idle:
        """The events of the next message in sequence (waits at most ``timeout``).

        ``RESTART`` means the job was re-dispatched after its worker died
        before anything reached the client: drop what was collected so far,
        the new attempt starts over. With ``idle`` > 0, ``IDLE`` comes back
        each time ``idle`` seconds pass without a message (a streaming caller
        sends a keep-alive then); the ``timeout`` still runs from the first
        call that waited for this message.
        """
        loop = asyncio.get_running_loop()
        if self._give_up is None:
            self._give_up = loop.time() + self.timeout
        wake = loop.time() + idle if idle > 0 else self._give_up
        while True:
            if self.failed is not None:
                raise self.failed
            try:
                item: Reply | BaseException | Idle | None = self.queue.get_nowait()  # under load, usually there
            except asyncio.QueueEmpty:
                item = await self._wait(self._give_up, wake)
            if item is None:
                continue
            if isinstance(item, Idle):
                return item
            if isinstance(item, BaseException):
                raise item
            if item.lost and item.attempt == self.attempt:
                self._give_up = None
                return await self._worker_lost()
            if self._in_order(item):
                self._give_up = None
                return self._take(item)

    async def _wait(self, give_up: float, wake: float) -> Reply | BaseException | Idle | None:
        """The next queued item; ``IDLE`` at ``wake``; None after asking again for a resend (while a gap may be
        open, every second: a request for a resend may be lost too). Raises WorkerTimeout at ``give_up``."""
        loop = asyncio.get_running_loop()
        gap = bool(self.ahead) or self.unsure
        try:
            async with asyncio.timeout_at(min(give_up, wake, loop.time() + GAP_RETRY) if gap else min(give_up, wake)):
                return await self.queue.get()  # no task per wait, unlike wait_for on 3.11
        except TimeoutError:
            now = loop.time()
            if now >= give_up:
                raise WorkerTimeout(f"No reply from the worker within {self.timeout:g} s.") from None
            if now >= wake:
                return IDLE
            self.router.gap(self)
            return None

    def _in_order(self, item: Reply) -> bool:
        """Whether ``item`` is the next message; one of a superseded attempt, a duplicate or one that came early
        (held until the gap before it is filled, which it asks for) is not."""
        if item.attempt != self.attempt or item.seq < self.next_seq:  # a superseded attempt; a duplicate
            return False
        if item.seq > self.next_seq:  # a gap: hold it, ask for what is missing (again, if asked long ago)
            if not self.ahead or asyncio.get_running_loop().time() - self.asked_at > GAP_RETRY:
                self.router.gap(self)
            self.ahead[item.seq] = item
            return False
        return True

    def _take(self, item: Reply) -> list[Event]:
        self.unsure = False
        self.last_seq = item.seq
        self.next_seq += 1
        if item.terminal:
            self.finished = True
        if self.ahead:  # the gap is closed: what came early is next, in order
            for seq in [s for s in self.ahead if s < self.next_seq]:
                del self.ahead[seq]
            early = self.ahead.get(self.next_seq)
            if early is not None:
                with contextlib.suppress(asyncio.QueueFull):  # full: tried again after the next message
                    self.queue.put_nowait(early)
                    del self.ahead[self.next_seq]
        return item.events

    async def _worker_lost(self) -> Restarted:
        if self.committed or self.retry is None:
            raise WorkerLost("The worker serving this request was lost after part of the reply was sent.")
        await self.retry(self)
        self.next_seq = 0
        self.ahead.clear()
        return RESTART

    @property
    def open(self) -> bool:
        """Whether the stream still takes replies (``close`` or ``BrokerClient.release`` ends that)."""
        return self.router.streams.get(self.rid) is self

    def close(self) -> None:
        self.router.streams.pop(self.rid, None)


class ReplyRouter:
    def __init__(self, redis: Redis, keys: Keys, gateway_id: str | None = None, *, buffer: int = 1024,
                 on_shed: Callable[[ReplyStream], None] | None = None,
                 on_gap: Callable[[list[ReplyStream]], None] | None = None) -> None:
        """``redis`` must be a raw (non-decoding) client: payloads are msgpack.

        ``on_gap`` is told of streams that may have missed messages (after a resubscription, or a gap in a
        stream's sequence), so it can ask their workers to send them again.
        """
        self.redis = redis
        self.keys = keys
        self.gateway_id = gateway_id or uuid.uuid4().hex[:12]
        self.channel = keys.replies(self.gateway_id)
        self.streams: dict[str, ReplyStream] = {}
        self.buffer = buffer
        self.on_shed = on_shed
        self.on_gap = on_gap
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        #: When (monotonic) the subscription last came back after a loss; 0 if it never broke.
        self.recovered_at = 0.0

    @property
    def live(self) -> bool:
        """Whether the reply subscription is up now (a job dispatched otherwise could answer unheard)."""
        return self._subscribed.is_set()

    async def wait_live(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the subscription; whether it is up."""
        if not self._subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._subscribed.wait()
        return self._subscribed.is_set()

    def gap(self, stream: ReplyStream) -> None:
        stream.asked_at = asyncio.get_running_loop().time()
        if self.on_gap is not None:
            self.on_gap([stream])

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"reply-router-{self.gateway_id}")
        await self._subscribed.wait()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def open(self, timeout: float, rid: str | None = None) -> ReplyStream:
        """A stream for the replies of request ``rid`` (a fresh id when None), registered before it is dispatched."""
        stream = ReplyStream(self, rid or uuid.uuid4().hex, timeout, self.buffer)
        self.streams[stream.rid] = stream
        return stream

    async def _run(self) -> None:
        await subscribe_forever(self.redis, self.channel, self._route, on_up=self._up, on_down=self._down)

    def _up(self, recovered: bool) -> None:
        self._subscribed.set()
        if recovered:  # whatever was published meanwhile reached nobody: ask for it again
            self.recovered_at = asyncio.get_running_loop().time()
            log.warning("reply channel back; asking workers to resend for %d streams", len(self.streams))
            for stream in self.streams.values():  # each asks again until a message of its arrives
                stream.unsure, stream.asked_at = True, self.recovered_at
            if self.on_gap is not None and self.streams:
                self.on_gap(list(self.streams.values()))

    def _down(self, exc: BaseException, first: bool) -> None:
        self._subscribed.clear()
        if first:
            log.warning("reply channel lost (%s); resubscribing", exc)

    def _route(self, data: bytes) -> None:
        try:
            replies = Reply.decode_all(data)
        except Exception:  # a malformed message must not kill every stream of this gateway
            log.exception("undecodable reply message dropped")
            return
        for reply in replies:
            self._deliver(reply)

    def _deliver(self, reply: Reply) -> None:
        stream = self.streams.get(reply.rid)
        if stream is None or stream.failed is not None:
            return
        try:
            stream.queue.put_nowait(reply)
        except asyncio.QueueFull:
            stream.failed = SlowClient(
                f"The client read too slowly: more than {self.buffer} reply messages were waiting for it.")
            if self.on_shed is not None:
                self.on_shed(stream)
