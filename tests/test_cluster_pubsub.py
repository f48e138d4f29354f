"""Sharded pub/sub on a real local Redis Cluster (SSUBSCRIBE/SPUBLISH), and classic pub/sub unchanged on one Redis.

The cluster tests share one 6-node cluster (3 masters, 3 replicas); the tests that stop or kill a master come
last, each on a master no earlier test has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from itertools import count
from typing import Any, cast

import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.exceptions import RedisError

import broker.pubsub as pubsub
from broker.connection import connect
from broker.pubsub import listeners, publish, publish_command, subscribe_forever
from redserve.redis_server import RedisCluster, RedisServer, free_port

#: From SIGKILL of the slot's master to a message published afterwards being received.
FAILOVER_BOUND = 15.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as c:
        yield c


@pytest.fixture(scope="module")
def stopped() -> set[int]:
    """Ports of the nodes a test stopped or killed: a later failover test leaves their shards alone."""
    return set()


@pytest.fixture
async def rc(cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    client = cast(ClusterClient, connect(cluster.url, decode=False))
    await client.initialize()
    yield client
    await client.aclose()


class Sub:
    """A running ``subscribe_forever``, and what it reported."""

    def __init__(self) -> None:
        self.ups: list[bool] = []
        self.downs: list[tuple[BaseException, bool]] = []
        self.messages: asyncio.Queue[Any] = asyncio.Queue()

    def up(self, recovered: bool) -> None:
        self.ups.append(recovered)

    def down(self, exc: BaseException, first: bool) -> None:
        self.downs.append((exc, first))

    async def until(self, done: Any, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def subscribed(client: Any, channel: str) -> AsyncIterator[Sub]:
    sub = Sub()
    task = asyncio.create_task(subscribe_forever(client, channel, sub.messages.put_nowait, on_up=sub.up,
                                                 on_down=sub.down))
    try:
        await sub.until(lambda: sub.ups)
        yield sub
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def channel_on(rc: ClusterClient, port: int, prefix: str) -> str:
    """A channel whose slot the master on ``port`` owns."""
    return next(ch for i in count() if (node := rc.get_node_from_key(ch := f"{prefix}:{i}")) and node.port == port)


def masters(rc: ClusterClient) -> list[int]:
    return sorted(int(n.port) for n in rc.get_primaries())


def shard_of(rc: ClusterClient, port: int) -> list[Any]:
    """The master on ``port`` and its replicas, as the client's slot table has them."""
    return next(nodes for nodes in rc.nodes_manager.slots_cache.values() if nodes[0].port == port)


async def replicas_synced(cluster: RedisCluster, port: int) -> list[int]:
    """Wait until the master on ``port`` has a replica with its replication link up (``redis-cli --cluster
    create`` adds the replicas after the slots, and a replica that never synced refuses to take over)."""
    master_id = cluster.cli(port, "CLUSTER", "MYID").strip()
    async with asyncio.timeout(15):
        while True:
            replicas = [int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
                        for line in cluster.cli(port, "CLUSTER", "NODES").splitlines()
                        if line.split()[3:4] == [master_id]]
            if replicas and all("master_link_status:up" in cluster.cli(r, "INFO", "replication") for r in replicas):
                return replicas
            await asyncio.sleep(0.1)


def node_at(cluster: RedisCluster, port: int) -> RedisServer:
    return next(n for n in cluster.nodes if n.port == port)


async def eventually_listeners(rc: ClusterClient, channel: str, expected: int) -> None:
    async with asyncio.timeout(5):
        while await listeners(rc, channel) != expected:
            await asyncio.sleep(0.02)


async def test_single_redis_unchanged(redis_url: str) -> None:
    client = connect(redis_url, decode=False)
    try:
        assert publish_command(client) == publish_command(client.pipeline()) == "PUBLISH"
        async with subscribed(client, "plain") as sub:
            assert sub.ups == [False]
            assert await listeners(client, "plain") == 1
            assert await publish(client, "plain", b"\x00one") == 1
            assert await asyncio.wait_for(sub.messages.get(), 5) == b"\x00one"
            pipe = client.pipeline(transaction=False)
            pipe.execute_command(publish_command(pipe), "plain", b"two")
            assert await pipe.execute() == [1]
            assert await asyncio.wait_for(sub.messages.get(), 5) == b"two"
            assert not sub.downs
        assert await listeners(client, "plain") == 0
    finally:
        await client.aclose()


async def test_sharded_round_trip_on_every_master(cluster: RedisCluster, rc: ClusterClient) -> None:
    assert publish_command(rc) == publish_command(rc.pipeline()) == "SPUBLISH"
    for port in masters(rc):
        channel = channel_on(rc, port, "trip")
        node = rc.get_node_from_key(channel)
        subscriber = connect(cluster.url, decode=False)
        try:
            async with subscribed(subscriber, channel) as sub:
                assert sub.ups == [False]
                assert await listeners(rc, channel) == 1
                # sharded, not classic: the owner counts no classic subscriber
                assert await rc.execute_command("PUBSUB NUMSUB", channel, target_nodes=node) == [(channel.encode(), 0)]
                assert await publish(rc, channel, b"\xffraw") == 1
                assert await asyncio.wait_for(sub.messages.get(), 5) == b"\xffraw"
                pipe = rc.pipeline()
                pipe.execute_command(publish_command(pipe), channel, b"piped")
                assert await pipe.execute() == [1]
                assert await asyncio.wait_for(sub.messages.get(), 5) == b"piped"
                assert not sub.downs
            await eventually_listeners(rc, channel, 0)
        finally:
            await subscriber.aclose()


async def test_decoding_client_gets_text(cluster: RedisCluster, rc: ClusterClient) -> None:
    text = connect(cluster.url)  # decode=True
    try:
        async with subscribed(text, "text") as sub:
            assert await publish(text, "text", "héllo") == 1
            assert await asyncio.wait_for(sub.messages.get(), 5) == "héllo"
            assert await listeners(text, "text") == 1
    finally:
        await text.aclose()


async def test_an_unreachable_cluster_is_retried_not_fatal() -> None:
    """No node answers (a cluster not up yet, or all of it restarting): breaks, with backoff, never an end."""
    nobody = cast(ClusterClient, connect(f"redis+cluster://127.0.0.1:{free_port()}", decode=False))
    sub = Sub()
    task = asyncio.create_task(subscribe_forever(nobody, "void", sub.messages.put_nowait, on_up=sub.up,
                                                 on_down=sub.down))
    try:
        await sub.until(lambda: len(sub.downs) >= 3)
        assert not task.done() and not sub.ups
        assert [first for _, first in sub.downs[:3]] == [True, False, False]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await nobody.aclose()


async def ping_calls(rc: ClusterClient, port: int) -> int:
    node = rc.get_node(host="127.0.0.1", port=port)
    stats = await rc.execute_command("INFO", "commandstats", target_nodes=node)
    return int(stats.get("cmdstat_ping", {}).get("calls", 0))


async def test_idle_subscription_is_pinged_and_stays_up(rc: ClusterClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pubsub, "IDLE_PING", 0.1)
    port = masters(rc)[0]
    channel = channel_on(rc, port, "idle")
    before = await ping_calls(rc, port)
    async with subscribed(rc, channel) as sub:
        await asyncio.sleep(1.0)
        assert await ping_calls(rc, port) - before >= 5  # answered ([pong, ""]) every time: no break
        assert sub.ups == [False] and not sub.downs
        assert await publish(rc, channel, b"still here") == 1
        assert await asyncio.wait_for(sub.messages.get(), 5) == b"still here"


async def test_slot_migration_resubscribes_at_the_new_owner(cluster: RedisCluster, rc: ClusterClient) -> None:
    """The old owner sends ``sunsubscribe`` when its slot is assigned away: a break, then the new owner."""
    src, dst = masters(rc)[:2]
    channel = channel_on(rc, src, "moving")
    slot = str(rc.keyslot(channel))
    src_id, dst_id = (cluster.cli(p, "CLUSTER", "MYID").strip() for p in (src, dst))
    async with subscribed(rc, channel) as sub:
        cluster.cli(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        cluster.cli(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        cluster.cli(dst, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        cluster.cli(src, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        await sub.until(lambda: True in sub.ups)
        assert "unsubscribed" in str(sub.downs[0][0]) and sub.downs[0][1]
        assert sub.ups == [False, True]
        assert rc.get_node_from_key(channel).port == dst  # the shared client's slot table was refreshed
        assert await listeners(rc, channel) == 1
        assert await publish(rc, channel, b"after the move") == 1
        assert await asyncio.wait_for(sub.messages.get(), 5) == b"after the move"


async def test_silent_master_is_noticed_by_ping(cluster: RedisCluster, rc: ClusterClient, stopped: set[int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A master that stops answering (SIGSTOP: the socket stays open) is a break within IDLE_PING + PING_TIMEOUT."""
    monkeypatch.setattr(pubsub, "IDLE_PING", 0.3)
    monkeypatch.setattr(pubsub, "PING_TIMEOUT", 0.3)
    port = masters(rc)[0]
    channel = channel_on(rc, port, "silent")
    node = node_at(cluster, port)
    assert node.proc is not None
    stopped.add(port)
    async with subscribed(rc, channel) as sub:
        node.proc.send_signal(signal.SIGSTOP)
        try:
            await sub.until(lambda: sub.downs, timeout=3)
        finally:
            node.proc.send_signal(signal.SIGCONT)
        assert "PING" in str(sub.downs[0][0])
        await sub.until(lambda: True in sub.ups, timeout=FAILOVER_BOUND)
        for _ in range(100):  # the node may have been failed over meanwhile: the publisher follows too
            with contextlib.suppress(RedisError):
                if await publish(rc, channel, b"awake") == 1:
                    break
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(sub.messages.get(), 5) == b"awake"


async def test_failover_after_sigkill_resubscribes_at_the_promoted_replica(cluster: RedisCluster,
                                                                         rc: ClusterClient, stopped: set[int]) -> None:
    """Last in the module: it kills a master for good (one whose shard no earlier test stopped)."""
    cluster.wait_ok()
    port = next(p for p in masters(rc)
                if p not in stopped and not stopped & {int(n.port) for n in shard_of(rc, p)})
    stopped.add(port)
    channel = channel_on(rc, port, "failover")
    victim = node_at(cluster, port)
    assert victim.proc is not None
    await replicas_synced(cluster, port)
    async with subscribed(rc, channel) as sub:
        assert sub.ups == [False]
        killed = time.monotonic()
        victim.proc.kill()
        victim.proc.wait()
        await sub.until(lambda: True in sub.ups, timeout=FAILOVER_BOUND)
        up = time.monotonic() - killed
        assert sub.ups == [False, True]
        assert sub.downs and sub.downs[0][1] and not any(first for _, first in sub.downs[1:])
        publisher = cast(ClusterClient, connect(cluster.url, decode=False))
        try:
            while (await _publish_retrying(publisher, channel, b"after failover")) != 1:
                assert time.monotonic() - killed < FAILOVER_BOUND
                await asyncio.sleep(0.1)
            assert await asyncio.wait_for(sub.messages.get(), FAILOVER_BOUND) == b"after failover"
            received = time.monotonic() - killed
            new_owner = publisher.get_node_from_key(channel)
            assert new_owner is not None and new_owner.port != port
        finally:
            await publisher.aclose()
    print(f"\nfailover: resubscribed {up:.2f}s and received {received:.2f}s after SIGKILL "
          f"({len(sub.downs)} failed attempts)")
    assert received < FAILOVER_BOUND


async def _publish_retrying(client: ClusterClient, channel: str, data: bytes) -> int:
    try:
        return await publish(client, channel, data)
    except RedisError:
        return -1
