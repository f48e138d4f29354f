"""Redis killed and restarted under the stack's feet, and a client too slow to read its stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time

import httpx
import pytest
import redis.asyncio as aioredis
from faultkit import pauses, stream_chat, tally
from support import Stack, kill, wait_for

from broker.keys import Keys
from redserve.redis_server import RedisServer, free_port
from workers.echo import echo_tokens


@pytest.fixture
async def own_redis(tmp_path):
    server = RedisServer(free_port(), directory=str(tmp_path))
    server.start()
    yield server
    server.close()


STREAMS = 40
TOKENS = 40


@contextlib.asynccontextmanager
async def streaming_stack(redis_server: RedisServer, settings, **overrides):  # noqa: ANN001, ANN201
    """A real worker process and a gateway on ``redis_server``, with 40 streams of 40 tokens (2 s each) in
    flight during the block; yields (stack, the streams' task)."""
    s = settings.model_copy(update={"redis_url": redis_server.url, **overrides})
    stack = Stack(s)
    try:
        stack.spawn_worker("phoenix", echo_delay=0.05, echo_tokens=TOKENS, max_concurrency=64)
        gw = await stack.gateway()
        await wait_for(lambda: _has_worker(gw.url), timeout=15)
        streams = asyncio.gather(*(stream_chat(gw.url, f"stream {i} " * TOKENS, max_tokens=TOKENS, timeout=40)
                                   for i in range(STREAMS)), return_exceptions=True)
        await asyncio.sleep(0.6)  # every stream has shown tokens
        yield stack, gw, streams
    finally:
        await stack.close()


async def _all_complete(outcome, streams) -> list:  # noqa: ANN001
    results = await streams
    await tally(outcome, results, ["".join(echo_tokens(f"stream {i} " * TOKENS, TOKENS)) for i in range(STREAMS)])
    pauses(outcome, results)
    return results


@pytest.mark.parametrize("persist", [True, False], ids=["aof", "no-persistence"])
async def test_redis_restart_under_streams(own_redis, settings, outcome, persist):
    """SIGKILL Redis under 40 streams and start it again on the same port: every stream completes, whole and
    in order, with no error: workers hold their replies and gateways resubscribe and ask for what they missed.
    Without persistence the state is gone, but the jobs lived in the workers: they finish all the same."""
    own_redis.stop()
    own_redis.persist = persist
    own_redis.start()
    async with streaming_stack(own_redis, settings) as (stack, gw, streams):
        kill(own_redis.proc)  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
        own_redis.start()
        await _all_complete(outcome, streams)
        assert outcome.ok == STREAMS, outcome.notes[:3]
        # Nothing is left counted against the worker: its queue drains to 0 (no ghost jobs).
        await wait_for(lambda: _queue_is_empty(own_redis.url, "phoenix"), timeout=15)
        assert await _try_chat(gw.url, "after the storm") == "".join(echo_tokens("after the storm", 8))


async def test_redis_paused_for_8_seconds(own_redis, settings, outcome):
    """SIGSTOP Redis for 8 s under 40 streams, then SIGCONT: every stream completes (they pause, nothing is
    lost); worker records that expired during the pause are written again before any janitor acts."""
    async with streaming_stack(own_redis, settings, worker_ttl=10.0, heartbeat_interval=1.0,
                               reply_timeout=20.0) as (stack, gw, streams):
        own_redis.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        await asyncio.sleep(8)
        own_redis.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        await _all_complete(outcome, streams)
        assert outcome.ok == STREAMS, outcome.notes[:3]


@pytest.mark.parametrize("kind", ["pubsub", "normal"])
async def test_redis_connections_cut(own_redis, settings, outcome, kind):
    """CLIENT KILL TYPE pubsub (every gateway's reply channel, every worker's control channel) or TYPE
    normal (every command connection) under 40 streams: every stream completes."""
    async with streaming_stack(own_redis, settings) as (stack, gw, streams):
        async with aioredis.Redis.from_url(own_redis.url) as admin:
            killed = await admin.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")
        assert killed >= 1
        await _all_complete(outcome, streams)
        assert outcome.ok == STREAMS, outcome.notes[:3]


async def test_requests_during_a_restart_wait_or_get_503(own_redis, settings, outcome):
    """Requests sent every 0.2 s through a Redis restart: each either completes or gets a 503 with
    Retry-After after at most redis_wait; none a 500, none a 504, none dropped. (Before: a plain 500, then
    504s after 60 s, as jobs went out while the gateway's subscription was still reconnecting.)"""
    async with streaming_stack(own_redis, settings, redis_wait=1.0) as (stack, gw, streams):
        await streams

        async def probe(i: int) -> tuple[int, float, str | None]:
            started = time.monotonic()
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
                r = await http.post("/v1/chat/completions", json={
                    "model": "echo", "messages": [{"role": "user", "content": f"probe {i}"}], "max_tokens": 4})
            took = time.monotonic() - started
            if r.status_code == 200:
                return 200, took, r.json()["choices"][0]["message"]["content"]
            assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
            return 503, took, None

        kill(own_redis.proc)  # type: ignore[arg-type]
        probes = []
        for i in range(20):
            probes.append(asyncio.create_task(probe(i)))
            if i == 5:
                own_redis.start()
            await asyncio.sleep(0.2)
        results = await asyncio.gather(*probes)
        for i, (status, took, text) in enumerate(results):
            outcome.requests += 1
            if status == 200:
                assert text == "".join(echo_tokens(f"probe {i}", 4))
                outcome.ok += 1
            else:
                assert took < 1.0 + 5, took  # redis_wait, plus a dispatch that was already waiting
                outcome.clean_errors += 1
        assert all(status == 200 for status, _, _ in results[-5:])  # once Redis is back, all served


async def test_jobs_that_ended_while_redis_was_away_free_their_slots(own_redis, settings, outcome):
    """A worker with 4 slots and a queue of 4: 4 streams end while Redis is down, so their entries cannot
    be retired then. Once Redis is back the worker retires them: its queue is 0 and 5 rounds of 4
    concurrent requests are served. (Before: the ghosts kept XLEN 4, score 4, and every request got a 429, for good.)"""
    s = settings.model_copy(update={"redis_url": own_redis.url})
    stack = Stack(s)
    try:
        stack.spawn_worker("small", echo_delay=0.05, echo_tokens=20, max_concurrency=4, max_queue=4)
        gw = await stack.gateway()
        await wait_for(lambda: _has_worker(gw.url), timeout=15)
        streams = [asyncio.create_task(stream_chat(gw.url, f"held {i} " * 20, max_tokens=20, timeout=30))
                   for i in range(4)]
        await asyncio.sleep(0.4)
        own_redis.stop()  # a clean stop: the AOF keeps the 4 pending entries
        own_redis.persist = True
        await asyncio.sleep(1.5)  # the streams' 20 tokens end meanwhile
        own_redis.start()
        results = await asyncio.gather(*streams)
        await tally(outcome, results, ["".join(echo_tokens(f"held {i} " * 20, 20)) for i in range(4)])
        await wait_for(lambda: _queue_is_empty(own_redis.url, "small"), timeout=15)
        for batch in range(5):  # the worker's whole capacity, five times over
            after = await asyncio.gather(*(_try_chat(gw.url, f"after {batch}.{i}") for i in range(4)))
            outcome.requests += 4
            outcome.ok += sum(a == "".join(echo_tokens(f"after {batch}.{i}", 8)) for i, a in enumerate(after))
        assert outcome.ok == 24, outcome.notes[:3]
    finally:
        await stack.close()


async def test_a_ghost_entry_is_run_or_retired(stack, redis, keys, outcome):
    """An entry delivered to a worker that no task of the worker runs (what a Redis restored from its AOF
    can hold) is noticed within two heartbeats: run if someone waits for it, retired otherwise."""
    w = await stack.worker(worker_id="keeper", heartbeat_interval=0.3)
    gw = await stack.gateway()
    client = gw.client()
    # A job the worker never saw: delivered to its consumer by hand, as the AOF would bring it back.
    await redis.xgroup_createconsumer(keys.jobs("echo", "keeper"), "workers", "keeper")
    from broker.protocol import Generate, Job, JobKind, Message

    ghost = Job(request_id="f" * 32, model="echo", kind=JobKind.CHAT, reply_to=keys.replies("gone-gateway"),
                params=Generate(messages=[Message("user", "nobody")]), deadline=time.time() + 60)
    await redis.xadd(keys.jobs("echo", "keeper"), ghost.to_fields())
    await redis.xreadgroup("workers", "keeper", {keys.jobs("echo", "keeper"): ">"}, count=1)
    await wait_for(lambda: redis.xlen(keys.jobs("echo", "keeper")), timeout=2)
    # Retired (its gateway is gone), and the worker's count is back to the truth.
    await wait_for(lambda: _queue_is_empty(stack.settings.redis_url, "keeper"), timeout=10)
    reply = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "fine"}])
    outcome.requests += 1
    outcome.ok += reply.choices[0].message.content == "".join(echo_tokens("fine", 8))
    assert outcome.ok == 1 and w.record.queue == 0


async def _queue_is_empty(url: str, worker_id: str) -> bool:
    async with aioredis.Redis.from_url(url, decode_responses=True) as r:
        stream = Keys().jobs("echo", worker_id)
        pending = await r.xpending(stream, "workers") if await r.exists(stream) else {"pending": 0}
        score = await r.zscore(Keys().model_workers("echo"), worker_id)
        return await r.xlen(stream) == 0 and pending["pending"] == 0 and (score or 0) == 0


async def _has_worker(url: str) -> bool:
    import httpx

    async with httpx.AsyncClient(base_url=url) as http:
        return bool((await http.get("/v1/models")).json()["data"])


async def _try_chat(url: str, text: str) -> str | None:
    try:
        res = await stream_chat(url, text, timeout=5, max_tokens=8)
    except Exception:  # noqa: BLE001 - still reconnecting
        return None
    return res.content if res.done and res.error is None else None


async def test_slow_client_is_shed_without_hurting_others(stack, redis, keys, outcome):
    """A client that never reads fills only its own bounded buffer; it is shed with its job cancelled,
    while another stream through the same gateway (and the same pub/sub connection) completes."""
    w = await stack.worker(worker_id="w", echo_delay=0.0005, echo_tokens=50_000, max_concurrency=4)
    gw = await stack.gateway(stream_buffer=16, send_timeout=2.0)
    host, port = gw.url.removeprefix("http://").split(":")
    # 4 KB tokens: the kernel's socket buffers (megabytes on loopback) fill within seconds.
    word = "flood" * 800
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": word}], "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        await wait_for(lambda: w.tasks, timeout=5)
        healthy = await stream_chat(gw.url, "meanwhile", max_tokens=8, timeout=20)
        # The flood's job is cancelled long before its 50,000 tokens (200 MB, 25 s of generation).
        await wait_for(lambda: not w.tasks, timeout=15)
        assert w.record.tokens_out < 50_000
        await tally(outcome, [healthy], ["".join(echo_tokens("meanwhile", 8))])
        outcome.requests += 1
        outcome.clean_errors += 1
        assert outcome.ok == 1
        # The gateway's shared reply connection survived: it still streams.
        after = await stream_chat(gw.url, "still fine", max_tokens=8, timeout=10)
        assert after.content == "".join(echo_tokens("still fine", 8))
    finally:
        sock.close()


async def test_batch_runner_outlives_redis(own_redis, settings, outcome):
    """The batch runner keeps running while Redis is away (before: rc 1 and a ConnectionError traceback),
    and runs a batch once it is back."""
    from batchkit import jsonl, lines, spawn_runner

    s = settings.model_copy(update={"redis_url": own_redis.url})
    stack = Stack(s)
    runner = spawn_runner(s)
    stack.procs.append(runner)
    try:
        stack.spawn_worker("batcher")
        gw = await stack.gateway()
        await wait_for(lambda: _has_worker(gw.url), timeout=15)
        own_redis.stop()
        await asyncio.sleep(3)
        assert runner.poll() is None, "the batch runner exited when Redis went away"
        own_redis.start()
        client = gw.client()
        uploaded = await wait_for(lambda: _upload(client, lines(20, max_tokens=2)), timeout=15, interval=0.2)
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        await wait_for(lambda: _finished(client, batch.id), timeout=30, interval=0.2)
        batch = await client.batches.retrieve(batch.id)
        out = jsonl((await client.files.content(batch.output_file_id)).content)
        outcome.requests += 20
        outcome.ok += len({o["custom_id"] for o in out if o["response"]["status_code"] == 200})
        assert outcome.ok == 20 and runner.poll() is None
    finally:
        await stack.close()


async def _upload(client, content: bytes):  # noqa: ANN001, ANN202
    try:
        return await client.files.create(file=("b.jsonl", content), purpose="batch")
    except Exception:  # noqa: BLE001 - the worker's record is not back yet, or Redis still loading
        return None


async def _finished(client, batch_id: str) -> bool:  # noqa: ANN001
    return (await client.batches.retrieve(batch_id)).status in ("completed", "failed", "cancelled", "expired")
