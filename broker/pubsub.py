"""Pub/sub that outlives Redis going away, and who listens on a channel.

Both the reply router (a gateway's reply channel) and a worker (its control
channel) hold one subscription for their whole life; when Redis restarts,
fails over or the connection is cut, they subscribe again with a short
backoff and are told so (``on_up(recovered=True)``), since whatever was
published meanwhile reached nobody.

On a single Redis (or behind Sentinels) this is classic pub/sub: SUBSCRIBE,
PUBLISH, PUBSUB NUMSUB. On a Redis Cluster it is sharded pub/sub (Redis 7):
SSUBSCRIBE, SPUBLISH, PUBSUB SHARDNUMSUB, so a message goes to the one shard
that owns the channel's slot instead of being broadcast over the whole
cluster bus. redis-py 5 (pinned below 6 by arq) has no sharded pub/sub in its
asyncio client: ``RedisCluster`` has no ``pubsub()`` and asyncio ``PubSub``
neither sends SSUBSCRIBE nor parses ``smessage``. So a cluster subscription is
a plain connection to the slot's owner, read here; a failover or a slot
migration ends it (the connection drops, or the node sends ``sunsubscribe``),
and it is made again at the new owner after refreshing the client's slot table.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.connection import UNREACHABLE, is_cluster, own_connection, refresh_slots
from broker.lane import Lane

#: A sharded subscription silent this long is asked for a PING; without an answer within PING_TIMEOUT it is dead.
IDLE_PING, PING_TIMEOUT = 15.0, 5.0
#: Bytes of messages a subscription hands on in one go before it gives the event loop a turn.
YIELD_AFTER = 64 * 1024
#: The most that finding the slot's owner, connecting and subscribing there may take (a hung node must not hang it).
SETUP_TIMEOUT = 10.0


def publish_command(redis: object) -> str:
    """The command that publishes on ``redis`` (a client or a pipeline): SPUBLISH on a cluster, else PUBLISH."""
    return "SPUBLISH" if is_cluster(redis) else "PUBLISH"


async def publish(redis: Redis, channel: str, data: bytes | str, *, lane: Lane | None = None) -> int:
    """Publish ``data`` on ``channel`` (on ``lane`` when given); how many subscribers received it."""
    if lane is not None:
        return int(await lane.execute("PUBLISH", channel, data))
    return int(await redis.execute_command(  # type: ignore[no-untyped-call]  # redis-py: no annotations
        publish_command(redis), channel, data))


async def subscribe_forever(redis: Redis, channel: str, on_message: Callable[[bytes], None], *,
                            on_up: Callable[[bool], None] | None = None,
                            on_down: Callable[[BaseException, bool], None] | None = None,
                            max_delay: float = 0.25) -> None:
    """Deliver every message of ``channel`` to ``on_message`` until cancelled.

    ``on_up(recovered)`` runs each time the subscription is (re)established;
    ``on_down(exc, first)`` each time it breaks (``first``: the first failure
    since it was last up).
    """
    delay, down = 0.05, False

    def up() -> None:
        nonlocal delay, down
        if on_up is not None:
            on_up(down)
        delay, down = 0.05, False

    cluster = is_cluster(redis)
    # on a cluster a refused SSUBSCRIBE (MOVED, CLUSTERDOWN) or an unreachable cluster is a break too
    errors = ((RedisError, RedisClusterException, OSError) if cluster
              else UNREACHABLE)
    while True:
        try:
            if cluster:
                await _sharded(cast(RedisCluster, redis), channel, on_message, up, refresh=down)
            else:
                await _classic(redis, channel, on_message, up)
        except errors as exc:
            if on_down is not None:
                on_down(exc, not down)
            down = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)


async def _classic(redis: Redis, channel: str, on_message: Callable[[bytes], None], up: Callable[[], None]) -> None:
    """One subscription on a single Redis (or the master behind Sentinels), until it breaks (raises)."""
    await _listen(own_connection(redis.connection_pool), "SUBSCRIBE", channel, on_message, up, where="Redis")


async def _sharded(cluster: RedisCluster, channel: str, on_message: Callable[[bytes], None], up: Callable[[], None],
                   *, refresh: bool) -> None:
    """One sharded subscription at the owner of ``channel``'s slot, until it breaks (raises)."""
    async with asyncio.timeout(SETUP_TIMEOUT):
        await cluster.initialize()
        if refresh:  # after a break: where the slot lives now (a replica promoted, a slot migrated)
            await refresh_slots(cluster)
    node = cluster.get_node_from_key(channel)
    assert node is not None  # the primary (only a replica lookup gives None)
    # in RESP2: pushes read as plain lists
    await _listen(own_connection(node, protocol=2), "SSUBSCRIBE", channel, on_message, up, where=node.name)


async def _listen(conn: AbstractConnection, command: str, channel: str, on_message: Callable[[bytes], None],
                  up: Callable[[], None], *, where: str) -> None:
    """Subscribe ``conn`` (``SUBSCRIBE`` or ``SSUBSCRIBE``) and hand on each message until it breaks.

    A connection of its own (``own_connection``), read here rather than through redis-py's ``PubSub``: a
    gateway's reply channel carries every token of every stream, and a message costs one parsed reply and one
    call this way. redis-py's health check is off (its PING expects +PONG, which a subscribed connection
    answers as a [pong, ""] push): a connection silent for IDLE_PING is asked for a PING here instead.
    """
    prefix = "s" if command == "SSUBSCRIBE" else ""
    confirmed, message, unsubscribed = (f"{prefix}{k}" for k in ("subscribe", "message", "unsubscribe"))
    message_kinds = (message, message.encode())
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            await conn.connect()  # type: ignore[no-untyped-call]  # redis-py: no annotations
            await conn.send_command(command, channel)
            if _kind(await conn.read_response()) != confirmed:
                raise RedisConnectionError(f"{where} did not confirm {command} {channel!r}")
        up()
        pinged, handed = False, 0
        while True:
            if handed > YIELD_AFTER:
                # Buffered messages are read without suspending: after a burst, let the loop run what else is
                # ready (client disconnects, replies on the lane) before the next one.
                await asyncio.sleep(0)
                handed = 0
            reply = await conn.read_response(timeout=PING_TIMEOUT if pinged else IDLE_PING)
            if reply is None:
                if pinged:
                    raise RedisTimeoutError(f"no answer to PING from {where} within {PING_TIMEOUT}s")
                await conn.send_command("PING", check_health=False)
                pinged = True
                continue
            pinged = False
            if reply[0] in message_kinds:
                on_message(reply[2])
                handed += len(reply[2])
            elif _kind(reply) == unsubscribed:  # a cluster node no longer owns the slot (migrated, or demoted)
                raise RedisConnectionError(f"{where} unsubscribed {channel!r}: it no longer serves its slot")
    finally:
        with contextlib.suppress(Exception):
            await conn.disconnect()


def _kind(reply: Any) -> str:
    """The type of a pub/sub push (``smessage``, ``ssubscribe``, ...): its first element, as text ("" for none)."""
    kind = reply[0] if isinstance(reply, list) and reply else b""
    return kind.decode() if isinstance(kind, bytes) else str(kind)


async def listeners(redis: Redis, channel: str) -> int:
    """How many connections are subscribed to ``channel`` now (0: whoever listened is gone)."""
    if is_cluster(redis):
        cluster = cast(RedisCluster, redis)
        await cluster.initialize()
        [(_, count)] = await cluster.execute_command("PUBSUB SHARDNUMSUB", channel,
                                                     target_nodes=cluster.get_node_from_key(channel))
    else:
        [(_, count)] = await redis.pubsub_numsub(channel)
    return int(count)
