"""One worker process's reply traffic, shipped in batches.

Every job hands its reply messages here and awaits how many gateways got
them. While one batch is on the wire the next one gathers; when it goes, the
messages bound for one gateway travel as *one* PUBLISH (a bundle, see
``broker.protocol.bundle``; SPUBLISH on a cluster, see ``broker.pubsub``) and a
resumable job's messages are also appended to its replay log (one EVALSHA
each: the log needs an entry per message; it lives in the request's slot, the
channel in the gateway's), all in one pipeline: one write and one round trip
per batch however many streams are open.

Nothing waits on a timer: a lone message goes out at once, so batching adds
no latency when the worker is idle and grows by itself under load.

When Redis is unreachable the batch on the wire is held and shipped again,
in order, once it is back, while the next batch keeps gathering: jobs go on
generating through a Redis restart. What waits is bounded in bytes
(``max_bytes``); past the bound the oldest waiting messages fail with
``OutboxOverflow``, and their jobs end saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from broker.connection import UNREACHABLE, execute, refresh_slots
from broker.protocol import bundle
from broker.pubsub import publish_command

log = logging.getLogger(__name__)


class OutboxOverflow(Exception):
    """Redis stayed away so long that this job's replies passed the outbox's byte bound."""


@dataclass(frozen=True, slots=True)
class ReplayLog:
    """Where a job's messages are also kept, so a client that reconnects can resume its stream."""

    emit: AsyncScript
    key: str
    ttl_ms: int
    max_entries: int = 100_000

    def args(self, data: bytes) -> list[Any]:
        return [data, self.ttl_ms, self.max_entries]


@dataclass(slots=True)
class _Batch:
    #: channel -> messages for it, and the publishers waiting on each.
    plain: dict[str, tuple[list[bytes], list[asyncio.Future[int]]]] = field(default_factory=dict)
    #: Messages also kept in a replay log (each is in ``plain`` too), with the publisher waiting on it.
    logged: list[tuple[ReplayLog, bytes, asyncio.Future[int]]] = field(default_factory=list)

    def futures(self) -> list[asyncio.Future[int]]:
        return [f for _, fs in self.plain.values() for f in fs]

    @property
    def size(self) -> int:
        return sum(len(m) for ms, _ in self.plain.values() for m in ms)


class Outbox:
    def __init__(self, redis: Redis, max_bytes: int = 64 * 2**20) -> None:
        """``redis`` must be a raw (non-decoding) client; ``max_bytes`` bounds what waits while Redis is away."""
        self.redis = redis
        self.max_bytes = max_bytes
        self._next = _Batch()
        self._ready = asyncio.Event()
        #: Counters for the metrics endpoint and the benchmark: messages in, commands out.
        self.messages = 0
        self.commands = 0
        #: Whether the last shipment reached Redis (False while it is away).
        self.connected = True

    async def publish(self, channel: str, data: bytes) -> int:
        """Publish one message; returns how many gateways received it."""
        return await self._enqueued(self._add(channel, data))

    async def emit(self, log: ReplayLog, channel: str, data: bytes) -> int:
        """Publish one message and append it to the job's replay log, in the same batch."""
        waiter = self._add(channel, data)
        self._next.logged.append((log, data, waiter))
        return await self._enqueued(waiter)

    def _add(self, channel: str, data: bytes) -> asyncio.Future[int]:
        waiter = self._future()
        messages, waiters = self._next.plain.setdefault(channel, ([], []))
        messages.append(data)
        waiters.append(waiter)
        return waiter

    async def run(self) -> None:
        """Ship batches until cancelled; whoever is still waiting then hears the outbox closed."""
        batch = self._next
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                batch, self._next = self._next, _Batch()
                await self._ship_until_sent(batch)
        finally:
            _fail(batch.futures() + self._next.futures(), ConnectionError("the worker's outbox closed"))

    async def _ship_until_sent(self, batch: _Batch) -> None:
        """Ship one batch, holding it (and trying again with backoff) while Redis is unreachable."""
        delay = 0.05
        while not await self._ship(batch):
            if self.connected:
                log.warning("Redis unreachable: holding reply messages until it is back")
            self.connected = False
            self._shed(batch)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        if not self.connected:
            log.warning("Redis is back: held reply messages sent")
        self.connected = True

    def _shed(self, batch: _Batch) -> None:
        """Past ``max_bytes`` waiting, fail the oldest messages (the held batch first) so their jobs end."""
        over = batch.size + self._next.size - self.max_bytes
        for waiting in (batch, self._next):
            for channel in list(waiting.plain):
                if over <= 0:
                    return
                messages, futures = waiting.plain.pop(channel)
                over -= sum(map(len, messages))
                _fail(futures, OutboxOverflow(f"more than {self.max_bytes} bytes of replies waited for Redis"))
                shed = set(futures)
                waiting.logged = [entry for entry in waiting.logged if entry[2] not in shed]

    def _future(self) -> asyncio.Future[int]:
        return asyncio.get_running_loop().create_future()

    async def _enqueued(self, waiter: asyncio.Future[int]) -> int:
        self.messages += 1
        self._ready.set()
        return await waiter

    async def _ship(self, batch: _Batch) -> bool:
        """Send a batch in one pipeline and settle its waiters; False (nothing settled) if Redis was unreachable."""
        pipe = self.redis.pipeline(transaction=False)
        publish = publish_command(pipe)
        for log, data, _ in batch.logged:  # the log first: a resumer never misses what a gateway heard
            # EVALSHA by hand: redis-py's pipelined scripts cost a SCRIPT EXISTS per batch (and a cluster
            # pipeline refuses its evalsha method).
            pipe.execute_command("EVALSHA", log.emit.sha, 1, log.key, *log.args(data))
        for channel, (messages, _) in batch.plain.items():
            pipe.execute_command(publish, channel, messages[0] if len(messages) == 1 else bundle(messages))
        self.commands += len(batch.plain) + len(batch.logged)
        try:
            results = await execute(pipe, raise_on_error=False)
        except UNREACHABLE:  # held: the caller ships it again once Redis answers
            return False
        except Exception as exc:  # a refused pipeline: every message of the batch failed alike
            _fail(batch.futures(), exc)
            return True
        if any(isinstance(r, UNREACHABLE) for r in results):
            # a cluster pipeline hands back a node's failure (CLUSTERDOWN during a failover, a dropped node) as
            # that command's result: hold the batch like an unreachable Redis (what did go out is sent again;
            # gateways drop what they already have, by seq), and read where the slots live now, which redis-py
            # does not do for a failure it returns (without it, the batch goes to the dead node again and again)
            with contextlib.suppress(*UNREACHABLE):
                await refresh_slots(self.redis)
            return False
        await self._settle_waiters(batch, results)
        return True

    async def _settle_waiters(self, batch: _Batch, results: list[Any]) -> None:
        """Each publisher hears its message's outcome: how many gateways got it, or why it failed."""
        for (log, data, waiter), result in zip(batch.logged, results):
            if isinstance(result, NoScriptError):  # Redis restarted since: EVAL loads it again
                result = await _settle(log.emit(keys=[log.key], args=log.args(data)))
            if isinstance(result, Exception) and not waiter.done():  # its message is not resumable: say so
                waiter.set_exception(result)
        waiters = [fs for _, fs in batch.plain.values()]
        for futures, result in zip(waiters, results[len(batch.logged):]):
            for f in futures:
                if f.done():  # its job was cancelled meanwhile
                    continue
                if isinstance(result, Exception):
                    f.set_exception(result)
                else:
                    f.set_result(result)


async def _settle(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except Exception as exc:
        return exc


def _fail(futures: list[asyncio.Future[int]], exc: BaseException) -> None:
    for f in futures:
        if not f.done():
            f.set_exception(exc)
