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
from typing import Any

from redis.asyncio import Redis

from broker.errors import ServeError
from broker.protocol import TERMINAL_EVENTS, Reply
from workers.outbox import Outbox, OutboxOverflow, ReplayLog

_OVERFLOW: dict[str, Any] = {"t": "overflow"}  # a marker in the pump's queue, never sent


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

    async def send(self, events: list[dict[str, Any]]) -> None:
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

    def keep(self, event: dict[str, Any]) -> None:
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
            [(_, subscribers)] = await self.redis.pubsub_numsub(self.channel)
            if subscribers > 0:
                return True
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(min(0.1, self.grace))

    async def pump(self, events: AsyncIterator[dict[str, Any]]) -> None:
        """Publish ``events`` until a terminal one; guarantees the stream ends."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        waiting = 0  # bytes of text produced but not yet handed to a send

        async def produce() -> None:
            nonlocal waiting
            try:
                async for ev in events:
                    waiting += len(ev.get("x", ""))
                    if waiting > self.max_waiting:  # Redis has been away that long: stop, say why later
                        queue.put_nowait(_OVERFLOW)
                        return
                    queue.put_nowait(ev)
                    if ev["t"] in TERMINAL_EVENTS:
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
                if _OVERFLOW in batch:
                    raise OutboxOverflow(f"more than {self.max_waiting} bytes of replies waited for Redis")
                waiting = 0
                if batch:
                    finished = finished or any(ev["t"] in TERMINAL_EVENTS for ev in batch)  # type: ignore[index]
                    await self.send(coalesce(batch))  # type: ignore[arg-type]
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer


def coalesce(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge runs of deltas of the same choice into one delta."""
    out: list[dict[str, Any]] = []
    for ev in events:
        prev = out[-1] if out else None
        if prev is not None and ev["t"] == "d" == prev["t"] and ev["i"] == prev["i"]:
            merged = {**prev, "x": prev["x"] + ev["x"], "k": prev["k"] + ev["k"]}
            if "lp" in prev or "lp" in ev:
                merged["lp"] = prev.get("lp", []) + ev.get("lp", [])
            out[-1] = merged
        else:
            out.append(ev)
    return out

