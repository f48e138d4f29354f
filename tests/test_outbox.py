"""The worker's outbox: concurrent reply messages leave in one pipeline, one PUBLISH per gateway channel.

Counted with INFO commandstats on the test's own Redis, so the claim "at most one
Redis command per message, fewer under load" is checked, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from broker.keys import Keys
from broker.protocol import Delta, Reply, unpack
from broker.replies import ReplyRouter
from broker.scripts import Scripts
from workers.outbox import Outbox, ReplayLog


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


@pytest.fixture
async def outbox(raw: aioredis.Redis) -> AsyncIterator[Outbox]:
    box = Outbox(raw)
    task = asyncio.create_task(box.run())
    yield box
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def calls(r: aioredis.Redis, command: str) -> int:
    return (await r.info("commandstats")).get(f"cmdstat_{command}", {}).get("calls", 0)


async def listen(r: aioredis.Redis, *channels: str) -> aioredis.client.PubSub:
    pubsub = r.pubsub()
    await pubsub.subscribe(*channels)
    return pubsub


async def received(pubsub: aioredis.client.PubSub, quiet: float = 0.3) -> list[bytes]:
    """Every message until the channel has been quiet for ``quiet`` seconds."""
    out: list[bytes] = []
    loop = asyncio.get_running_loop()
    until = loop.time() + quiet
    while loop.time() < until:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if msg is not None:  # (None also stands for a skipped subscribe confirmation)
            out.append(msg["data"])
            until = loop.time() + quiet
    return out


def message(rid: str, seq: int = 0) -> bytes:
    return Reply(rid, seq, [Delta(0, rid)]).encode()


async def test_concurrent_messages_leave_as_one_publish_per_gateway(raw, outbox):
    pubsub = await listen(raw, "gw-a", "gw-b")
    before = await calls(raw, "publish")
    sends = [outbox.publish("gw-a", message(f"a{i}")) for i in range(10)]
    sends += [outbox.publish("gw-b", message(f"b{i}")) for i in range(5)]
    assert await asyncio.gather(*sends) == [1] * 15  # each publisher learns its gateway got it
    assert await calls(raw, "publish") - before == 2
    assert (outbox.messages, outbox.commands) == (15, 2)

    got = await received(pubsub)
    assert len(got) == 2
    rids = [[r.rid for r in Reply.decode_all(data)] for data in got]
    assert sorted(rids) == [[f"a{i}" for i in range(10)], [f"b{i}" for i in range(5)]]  # in order
    await pubsub.aclose()


async def test_a_lone_message_is_a_plain_reply_and_nobody_listening_reads_zero(raw, outbox):
    pubsub = await listen(raw, "gw-a")
    assert await outbox.publish("gw-a", message("solo")) == 1
    [data] = await received(pubsub)
    assert unpack(data)["rid"] == "solo"  # not wrapped in a bundle: what redis-cli users see at low load
    assert await outbox.publish("gw-nobody", message("lost")) == 0
    await pubsub.aclose()


async def test_logged_messages_reach_the_log_and_survive_a_script_flush(raw, outbox):
    scripts = Scripts.register(raw)
    log = ReplayLog(scripts.emit, "test:replay:r1", ttl_ms=60_000)
    pubsub = await listen(raw, "gw-a")
    await raw.script_flush()  # as after a Redis restart: the pipelined EVALSHA fails, EVAL reloads it
    assert await asyncio.gather(*(outbox.emit(log, "gw-a", message("r1", i)) for i in range(3))) == [1, 1, 1]
    entries = await raw.xrange(log.key)
    assert [Reply.decode(fields[b"r"]).seq for _, fields in entries] == [0, 1, 2]
    heard = [r for data in await received(pubsub) for r in Reply.decode_all(data)]
    assert [r.seq for r in heard] == [0, 1, 2]  # published too (bundled with what else went to this gateway)
    assert 0 < await raw.pttl(log.key) <= 60_000
    await pubsub.aclose()


async def test_a_closed_outbox_fails_its_waiters_instead_of_hanging(raw):
    box = Outbox(raw)
    task = asyncio.create_task(box.run())
    await asyncio.sleep(0)
    waiting = asyncio.create_task(box.publish("gw-a", message("x")))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(waiting, 5)


async def test_the_router_delivers_each_reply_of_a_bundle_to_its_stream(raw, outbox):
    router = ReplyRouter(raw, Keys("bundletest"))
    await router.start()
    try:
        streams = [router.open(timeout=5) for _ in range(3)]
        await asyncio.gather(*(outbox.publish(router.channel, message(s.rid)) for s in streams))
        assert outbox.commands == 1
        for s in streams:
            [event] = await s.next_events()
            assert event == Delta(0, s.rid)
    finally:
        await router.stop()
