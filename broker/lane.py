"""One pipelined connection for the commands every request sends (dispatch, cancel): the hot lane.

redis-py takes a connection from its pool for each command, encodes each
argument in Python and waits for the reply before the connection is free
again, so a gateway starting 256 streams at once pays 256 writes, 256 reads
and a dispatch's 30 arguments encoded one by one, per request. The lane holds
one connection of the same pool (so the same URL, credentials, TLS and
Sentinel discovery) and packs a command with hiredis in one call. The first
command of an event-loop turn is written at once; those issued after it in the
same turn go out together as one write when the turn ends. Redis answers in
order, so one reader task hands each reply to its caller. A lone command (one
request at a time, one cancel) waits for nothing; a burst costs two writes.

A lost connection fails every command waiting on it with ``ConnectionError``
(the callers' own patience, as with redis-py, decides whether to try again)
and the next command connects afresh. Redis Cluster routes each command by
its slot, so a cluster client has no lane (``Lane.of`` gives None) and its
callers use redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import BusyLoadingError, ConnectionError, NoScriptError, ResponseError

from broker.connection import UNREACHABLE, is_cluster, own_connection

#: Seconds the oldest command may go unanswered before the connection is taken for dead (a peer gone without a
#: reset: a partition, a NAT that forgot the mapping); every command on it then fails and the next reconnects.
REPLY_DEADLINE = 30.0


class Lane:
    """One pipelined connection; ``execute`` is safe to call from any number of tasks at once."""

    def __init__(self, redis: Redis) -> None:
        """``redis``: the (non-cluster) client whose pool makes the lane's connection."""
        self.redis = redis
        self._conn: AbstractConnection | None = None
        self._connecting: asyncio.Future[AbstractConnection] | None = None
        self._outgoing: list[bytes] = []
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._reader: asyncio.Task[None] | None = None
        self._flush_scheduled = False
        self._watch: asyncio.TimerHandle | None = None
        #: Connections being let go in the background (held here: the loop keeps only weak references to tasks).
        self._dropping: set[asyncio.Future[Any]] = set()

    @classmethod
    def of(cls, redis: Redis) -> Lane | None:
        """A lane over ``redis``'s pool; None on a cluster (commands go where their slot lives)."""
        return None if is_cluster(redis) else cls(redis)

    async def execute(self, *args: Any) -> Any:
        """Send one command (with whatever else is sent this loop turn) and wait for its reply.

        Raises the reply's ``ResponseError``, or ``ConnectionError`` when the connection was lost with the
        command on it (it may or may not have run).
        """
        packed = hiredis.pack_command(args)  # before anything is queued: a bad argument must not shift replies
        if self._conn is None and await self._connect() is not self._conn:
            raise ConnectionError("lost the lane to Redis as it connected")
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(reply)
        if self._watch is None:
            self._watch = loop.call_later(REPLY_DEADLINE, self._check, reply)
        if self._flush_scheduled:  # the turn's first command went out: the rest go together at its end
            self._outgoing.append(packed)
        else:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
            self._write([packed])  # a lone command waits for no turn to end
        return await reply

    async def evalsha(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """Run a registered script, loading it once if this Redis does not know it (restarted, failed over)."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.execute("SCRIPT", "LOAD", script.script)
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def close(self) -> None:
        """Drop the connection; commands still waiting fail with ConnectionError."""
        if self._connecting is not None:
            self._connecting.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._conn is not None:
            self._lost(ConnectionError("the lane was closed"))
        await asyncio.gather(*self._dropping, return_exceptions=True)

    async def _connect(self) -> AbstractConnection:
        """The lane's connection, made once however many callers ask at the same time."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> AbstractConnection:
        """Connect (through the pool's connection class: credentials, TLS, the master a Sentinel names) and start
        the reader."""
        try:
            conn = own_connection(self.redis.connection_pool)
            await conn.connect()  # type: ignore[no-untyped-call]  # redis-py: no annotations
            self._conn = conn
            self._reader = asyncio.ensure_future(self._read(conn))
            return conn
        finally:
            self._connecting = None

    def _flush(self) -> None:
        """Write what this loop turn queued. (``_lost`` empties the queue with the connection, so whatever is
        queued now was queued on the current one.)"""
        self._flush_scheduled = False
        data, self._outgoing = self._outgoing, []
        if data:
            self._write(data)

    def _write(self, data: list[bytes]) -> None:
        writer = self._conn._writer if self._conn is not None else None  # redis-py keeps its stream private
        if writer is None:
            return
        try:
            writer.writelines(data)  # the transport buffers what the socket does not take at once
        except UNREACHABLE as exc:
            self._lost(ConnectionError(f"lost the lane to Redis: {exc}"))

    async def _read(self, conn: AbstractConnection) -> None:
        """Hand each reply, in order, to the command that waits for it."""
        waiting = self._waiting
        while True:
            try:
                value: Any = await conn.read_response(disconnect_on_error=False)
            except (ResponseError, BusyLoadingError) as exc:  # a reply (LOADING is one, though a ConnectionError)
                value = exc
            except BaseException as exc:
                self._lost(exc if isinstance(exc, ConnectionError) else ConnectionError(f"lost the lane: {exc!r}"))
                return
            if not waiting:  # nothing asked for it: the stream is out of step, start over
                self._lost(ConnectionError("an unexpected reply on the lane"))
                return
            reply = waiting.popleft()
            if reply.done():  # its caller stopped waiting (cancelled)
                continue
            if isinstance(value, ResponseError | BusyLoadingError):
                reply.set_exception(value)
            else:
                reply.set_result(value)

    def _check(self, oldest: asyncio.Future[Any]) -> None:
        """The reply deadline of ``oldest``: still the first unanswered command, the connection is dead."""
        self._watch = None
        if self._waiting and self._waiting[0] is oldest:
            self._lost(ConnectionError(f"no reply from Redis on the lane within {REPLY_DEADLINE:g} s"))
        elif self._waiting:
            self._watch = asyncio.get_running_loop().call_later(REPLY_DEADLINE, self._check, self._waiting[0])

    def _lost(self, exc: BaseException) -> None:
        """Fail every command on the connection and drop it; the next command connects again."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        conn, self._conn = self._conn, None
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._reader = None
        waiting, self._waiting = self._waiting, deque()
        self._outgoing = []
        for reply in waiting:
            if not reply.done():
                reply.set_exception(exc)
        if conn is not None:
            with contextlib.suppress(Exception):
                transport = conn._writer.transport if conn._writer is not None else None
                if transport is not None:
                    transport.abort()
            dropping = asyncio.ensure_future(conn.disconnect(nowait=True))  # redis-py's bookkeeping of the socket
            self._dropping.add(dropping)
            dropping.add_done_callback(self._dropping.discard)


async def run_script(lane: Lane | None, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
    """``script`` on the lane when there is one, else through redis-py (a cluster, or no lane wanted)."""
    if lane is not None:
        return await lane.evalsha(script, keys, args)
    return await script(keys=keys, args=args)
