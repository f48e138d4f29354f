"""Worker lifecycle with real processes and signals: death, drain, shared pools, cancellation."""

from __future__ import annotations

import asyncio
import signal
import time

from faults.faultkit import stream_chat
from support import kill, wait_for

from broker.pubsub import listeners
from workers.echo import echo_tokens


async def chat(client, content: str = "hello world", **kw) -> str:
    r = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": content}], **kw)
    return r.choices[0].message.content


async def test_killed_worker_leaves_dispatch_within_its_ttl(stack, redis, keys, settings):
    victim = stack.spawn_worker("victim")
    await stack.worker(worker_id="survivor")
    await wait_for(lambda: redis.exists(keys.worker("victim")))
    gw = await stack.gateway()

    kill(victim)
    killed = time.monotonic()
    await wait_for(lambda: not_(redis.exists(keys.worker("victim"))), timeout=settings.worker_ttl + 2)
    assert time.monotonic() - killed <= settings.worker_ttl + 0.5

    # From now on every request lands on the survivor and succeeds.
    results = await asyncio.gather(*(chat(gw.client()) for _ in range(20)))
    assert results == ["".join(echo_tokens("hello world", 8))] * 20
    assert await redis.zscore(keys.model_workers("echo"), "victim") is None
    assert int(await redis.hget(keys.worker("survivor"), "jobs_done") or 0) >= 0
    survivor = stack.workers[0][0]
    assert survivor.record.jobs_done == 20


async def not_(awaitable):
    return not await awaitable


async def test_sigterm_drains_without_failing_a_request(stack, redis, keys):
    # Slow tokens, so requests are in flight (and queued) when the signal lands.
    drained = stack.spawn_worker("drained", echo_delay=0.05, max_concurrency=4)
    await wait_for(lambda: redis.exists(keys.worker("drained")))
    gw = await stack.gateway()
    client = gw.client()

    async def stream_one(i: int) -> str:
        s = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": f"drain test {i}"}], stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

    tasks = [asyncio.create_task(stream_one(i)) for i in range(8)]  # 4 running, 4 waiting in the stream
    await wait_for(lambda: redis.xlen(keys.jobs("echo", "drained")), timeout=5)
    await asyncio.sleep(0.1)
    await stack.worker(worker_id="fresh")  # somewhere for new traffic to go
    drained.send_signal(signal.SIGTERM)
    await wait_for(lambda: redis_status_is(redis, keys.worker("drained"), "draining"), timeout=5)

    # While draining, new requests go elsewhere.
    assert await chat(client) == "".join(echo_tokens("hello world", 8))
    results = await asyncio.gather(*tasks)
    assert results == ["".join(echo_tokens(f"drain test {i}", 8)) for i in range(8)]
    assert await asyncio.to_thread(drained.wait, 15) == 0
    assert not await redis.exists(keys.worker("drained"))
    assert await redis.zscore(keys.model_workers("echo"), "drained") is None
    assert "drained" not in await redis.hkeys(keys.workers())


async def redis_status_is(redis, key: str, status: str) -> bool:
    return await redis.hget(key, "status") == status


async def test_two_gateways_share_one_pool_of_workers(stack, redis, keys):
    a = await stack.worker(worker_id="a", echo_delay=0.01)
    b = await stack.worker(worker_id="b", echo_delay=0.01)
    gw1, gw2 = await stack.gateway(), await stack.gateway()
    assert gw1.url != gw2.url
    results = await asyncio.gather(*(chat(gw.client(), f"from {i}") for i, gw in enumerate([gw1, gw2] * 10)))
    assert results == ["".join(echo_tokens(f"from {i}", 8)) for i in range(20)]
    # Shortest-queue dispatch across both gateways used both workers.
    assert a.record.jobs_done + b.record.jobs_done == 20
    assert a.record.jobs_done >= 5 and b.record.jobs_done >= 5
    # Each gateway has its own reply channel; both are subscribed once (sharded channels on a cluster).
    channels = {gw.server.config.app.state.broker.router.channel for gw in (gw1, gw2)}  # type: ignore[attr-defined]
    assert len(channels) == 2
    assert [await listeners(redis, c) for c in channels] == [1, 1]


async def test_client_disconnect_cancels_the_job_on_the_worker(stack, redis, keys):
    w = await stack.worker(worker_id="w", echo_delay=0.2, echo_tokens=100)
    gw = await stack.gateway()
    seen = await stream_chat(gw.url, "long one", stop_after=2)  # then hang up
    assert seen.chunks == 2
    assert w.tasks  # still generating at the moment we hang up
    hung_up = time.monotonic()
    await wait_for(lambda: not w.tasks, timeout=3)
    assert time.monotonic() - hung_up < 1.0  # well before the 20 s the reply would have taken
    assert await redis.zscore(keys.model_workers("echo"), "w") == 0
    assert await redis.xlen(keys.jobs("echo", "w")) == 0
    assert w.record.tokens_out < 10


async def test_heartbeat_refreshes_the_record_and_reports_load(stack, redis, keys, settings):
    await stack.worker(worker_id="hb")
    first = await redis.hget(keys.worker("hb"), "last_heartbeat")
    ttl = await redis.pttl(keys.worker("hb"))
    assert 0 < ttl <= settings.worker_ttl * 1000
    await asyncio.sleep(settings.heartbeat_interval * 2.5)
    assert await redis.hget(keys.worker("hb"), "last_heartbeat") != first
    rec = await redis.hgetall(keys.worker("hb"))
    assert rec["status"] == "ready" and rec["models"] == "echo" and rec["engine"] == "echo"
    assert {"id", "speed", "max_concurrency", "host", "pid", "started_at", "version"} <= rec.keys()


async def test_job_cancelled_while_queued_never_runs(stack, redis, keys):
    w = await stack.worker(worker_id="one-slot", echo_delay=0.1, max_concurrency=1)
    gw = await stack.gateway()
    client = gw.client()
    first = asyncio.create_task(chat(client, "runs first"))  # takes 0.8 s, holds the only slot
    await wait_for(lambda: w.tasks, timeout=3)
    second = asyncio.create_task(chat(client, "never runs"))
    await wait_for(lambda: redis.xlen(keys.jobs("echo", "one-slot")), timeout=3)
    await wait_for(lambda: eq(redis.xlen(keys.jobs("echo", "one-slot")), 2), timeout=3)
    second.cancel()  # the client gives up while its job waits behind the first
    assert await first == "".join(echo_tokens("runs first", 8))
    await wait_for(lambda: eq(redis.xlen(keys.jobs("echo", "one-slot")), 0), timeout=3)
    assert w.record.tokens_out == 8  # only the first job generated anything
    assert w.record.jobs_done == 2  # the second was read, recognised as cancelled and retired


async def eq(awaitable, value) -> bool:
    return await awaitable == value


async def test_a_job_read_as_soon_as_queued_skips_the_listeners_check(stack, redis):
    """A job read while the worker's reader keeps draining its stream was queued moments ago, by a gateway alive
    then: it starts without asking Redis whether that gateway still listens (one round trip less before the
    first token). A job that waited behind others is still checked (test_gateway_gone_its_jobs_are_not_generated)."""
    w = await stack.worker(worker_id="w")
    client = (await stack.gateway()).client()

    async def checks() -> int:  # PUBSUB NUMSUB (SHARDNUMSUB on a cluster) calls so far
        stats = await redis.info("commandstats")
        return sum(stats.get(f"cmdstat_pubsub|{c}", {}).get("calls", 0) for c in ("numsub", "shardnumsub"))

    await chat(client, "the reader has read the stream empty before this one")
    before = await checks()
    assert [await chat(client, f"fresh {i}") for i in range(3)] == ["".join(echo_tokens(f"fresh {i}", 8))
                                                                  for i in range(3)]
    assert await checks() == before and w.record.jobs_done == 4
