"""Token replies: one pub/sub connection per gateway process carries all its requests.

The router SUBSCRIBEs once to the process's reply channel and demultiplexes
messages by request id into per-request queues. A request registers its
queue *before* it is dispatched, so no reply can arrive unseen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any, AsyncIterator

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.errors import ReplyLost, WorkerTimeout
from broker.keys import Keys
from broker.protocol import Reply

log = logging.getLogger(__name__)


class ReplyStream:
    """The replies of one request, in order, as an async iterator of events."""

    def __init__(self, router: "ReplyRouter", rid: str, timeout: float) -> None:
        self.router = router
        self.rid = rid
        self.timeout = timeout
        self.queue: asyncio.Queue[Reply | BaseException] = asyncio.Queue()
        self.next_seq = 0
        self.finished = False
        #: Set by whoever dispatched the request, so it can be cancelled.
        self.worker_id: str | None = None

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Yield events until a terminal one; raise WorkerTimeout on silence, ReplyLost on a broken channel."""
        while not self.finished:
            for ev in await self.next_events():
                yield ev

    async def next_events(self) -> list[dict[str, Any]]:
        """The events of the next message in sequence (waits at most ``timeout``)."""
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), self.timeout)
            except asyncio.TimeoutError:
                raise WorkerTimeout(f"No reply from the worker within {self.timeout:g} s.") from None
            if isinstance(item, BaseException):
                raise item
            if item.seq < self.next_seq:  # duplicate delivery: already seen
                continue
            if item.seq > self.next_seq:
                raise ReplyLost(f"Reply messages {self.next_seq}..{item.seq - 1} were lost.")
            self.next_seq += 1
            if item.terminal:
                self.finished = True
            return item.events

    def close(self) -> None:
        self.router.streams.pop(self.rid, None)


class ReplyRouter:
    def __init__(self, redis: Redis, keys: Keys, gateway_id: str | None = None) -> None:
        """``redis`` must be a raw (non-decoding) client: payloads are msgpack."""
        self.redis = redis
        self.keys = keys
        self.gateway_id = gateway_id or uuid.uuid4().hex[:12]
        self.channel = keys.replies(self.gateway_id)
        self.streams: dict[str, ReplyStream] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"reply-router-{self.gateway_id}")
        await self._subscribed.wait()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def open(self, timeout: float) -> ReplyStream:
        stream = ReplyStream(self, uuid.uuid4().hex, timeout)
        self.streams[stream.rid] = stream
        return stream

    async def _run(self) -> None:
        delay = 0.05
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                delay = 0.05
                async for msg in pubsub.listen():
                    self._route(msg["data"])
            except (RedisConnectionError, OSError) as exc:
                log.warning("reply channel lost (%s); reconnecting in %.2fs", exc, delay)
                self._fail_all(ReplyLost("The connection to Redis was lost while the request was in flight."))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _route(self, data: bytes) -> None:
        try:
            reply = Reply.decode(data)
        except Exception:  # a malformed message must not kill every stream of this gateway
            log.exception("undecodable reply message dropped")
            return
        stream = self.streams.get(reply.rid)
        if stream is not None:
            stream.queue.put_nowait(reply)

    def _fail_all(self, exc: BaseException) -> None:
        for stream in list(self.streams.values()):
            stream.queue.put_nowait(exc)
