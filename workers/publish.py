"""Publishing one job's events, coalescing deltas that pile up behind a slow publish.

While one message is in flight the engine keeps producing; whatever it
produced meanwhile goes out as *one* message (consecutive deltas of a choice
merged), so a fast engine costs fewer messages than tokens and a slow one
exactly one per token. Messages go out through the worker's ``Outbox``, which
bundles those of concurrent jobs.

Pub/sub forgets: a message published while the gateway's subscription is
down (Redis restarted, a connection cut) reaches nobody. So a publisher keeps
every message it sent, and sends them again from any ``seq`` when the gateway
asks (``resend``). A message nobody heard is not a dead gateway yet: only a
gateway unheard for ``grace`` seconds is (``Orphaned``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from broker.errors import ServeError
from broker.protocol import Delta, Event, Reply
from broker.pubsub import listeners
from workers.outbox import Outbox, OutboxOverflow, ReplayLog


class _Overflow:
    """Put in the pump's queue when Redis has been away too long; never sent."""


_OVERFLOW = _Overflow()


class Orphaned(Exception):
    """Nobody is subscribed to the reply channel any more: the gateway is gone."""


class ReplyPublisher:
    def __init__(self, redis: Redis, outbox: Outbox, channel: str, rid: str, attempt: int = 0,
                 replay: ReplayLog | None = None, *, grace: float = 5.0, max_waiting: int = 16 * 2**20) -> None:
        """``grace``: seconds unheard before the gateway counts as gone; ``max_waiting``: bytes of text this job
        may produce while its messages cannot be sent (Redis away) before it is stopped."""
        self.redis = redis
        self.outbox = outbox
        self.channel = channel
        self.rid = rid
        self.attempt = attempt
        self.replay = replay
        self.grace = grace
        self.max_waiting = max_waiting
        self.seq = 0
        #: Every message sent, by seq: what ``resend`` sends again.
        self.history: list[bytes] = []
        self._unheard_since: float | None = None

    async def send(self, events: list[Event]) -> None:
        """Publish one message (at most one Redis command, log included).

        Raises Orphaned once no gateway has heard this job for ``grace`` seconds (a resumable job keeps going
        into its log regardless).
        """
        data = Reply(self.rid, self.seq, events, self.attempt).encode()
        self.seq += 1
        self.history.append(data)
        try:
            if self.replay is None:
                received = await self.outbox.publish(self.channel, data)
            else:
                received = await self.outbox.emit(self.replay, self.channel, data)
        except OutboxOverflow:  # never sent: its seq goes to the message that says why
            self.seq -= 1
            self.history.pop()
            raise
        if received or self.replay is not None:
            self._unheard_since = None
            return
        now = time.monotonic()
        if self._unheard_since is None:
            self._unheard_since = now
        elif now - self._unheard_since > self.grace:
            raise Orphaned(self.channel)

    def keep(self, event: Event) -> None:
        """Add a message to the history without sending it (the job ended unheard: a resend will tell)."""
        self.history.append(Reply(self.rid, self.seq, [event], self.attempt).encode())
        self.seq += 1

    async def resend(self, from_seq: int) -> None:
        """Send again every message from ``from_seq`` on, in order (the gateway missed them)."""
        for data in self.history[from_seq:]:
            await self.outbox.publish(self.channel, data)

    async def listened(self) -> bool:
        """Whether a gateway listens for this job's replies, waiting up to ``grace`` for one that reconnects."""
        end = time.monotonic() + self.grace
        while True:
            if await listeners(self.redis, self.channel) > 0:
                return True
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(min(0.1, self.grace))

    async def pump(self, events: AsyncIterator[Event]) -> None:
        """Publish ``events`` until a terminal one; guarantees the stream ends."""
        queue: asyncio.Queue[Event | _Overflow | None] = asyncio.Queue()

        waiting = 0  # bytes of text produced but not yet handed to a send

        async def produce() -> None:
            nonlocal waiting
            try:
                async for ev in events:
                    if isinstance(ev, Delta):
                        waiting += len(ev.text)
                    if waiting > self.max_waiting:  # Redis has been away that long: stop, say why later
                        queue.put_nowait(_OVERFLOW)
                        return
                    queue.put_nowait(ev)
                    if ev.terminal:
                        return
                queue.put_nowait(ServeError("The engine ended without finishing the request.").event())
            finally:
                queue.put_nowait(None)

        producer = asyncio.create_task(produce())
        try:
            finished = False
            while not finished:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                if batch[-1] is None:
                    batch.pop()
                    finished = True
                if any(isinstance(ev, _Overflow) for ev in batch):
                    raise OutboxOverflow(f"more than {self.max_waiting} bytes of replies waited for Redis")
                waiting = 0
                ready = [ev for ev in batch if ev is not None and not isinstance(ev, _Overflow)]
                if ready:
                    finished = finished or any(ev.terminal for ev in ready)
                    await self.send(coalesce(ready))
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer


def coalesce(events: list[Event]) -> list[Event]:
    """Merge runs of deltas of the same choice into one delta."""
    out: list[Event] = []
    for ev in events:
        prev = out[-1] if out else None
        if isinstance(ev, Delta) and isinstance(prev, Delta) and ev.index == prev.index:
            out[-1] = prev.merged(ev)
        else:
            out.append(ev)
    return out

