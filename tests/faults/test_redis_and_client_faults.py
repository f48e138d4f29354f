"""Redis killed and restarted under the stack's feet, and a client too slow to read its stream."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from support import Stack
from faultkit import stream_chat, tally
from redserve.redis_server import RedisServer, free_port
from support import wait_for
from workers.echo import echo_tokens


@pytest.fixture
async def own_redis(tmp_path):
    server = RedisServer(free_port(), directory=str(tmp_path))
    server.start()
    yield server
    server.close()


@pytest.mark.parametrize("persist", [False, True], ids=["no-persistence", "aof"])
async def test_redis_restart(own_redis, settings, outcome, persist):
    """In-flight requests end with a clean error; workers re-register; new requests succeed within seconds."""
    own_redis.stop()
    own_redis.persist = persist
    own_redis.start()
    s = settings.model_copy(update={"redis_url": own_redis.url})
    stack = Stack(s)
    try:
        stack.spawn_worker("phoenix", echo_delay=0.1, echo_tokens=100)
        gw = await stack.gateway()
        await wait_for(lambda: _has_worker(gw.url), timeout=15)
        in_flight = asyncio.create_task(stream_chat(gw.url, "interrupted", timeout=20))
        await asyncio.sleep(0.5)
        own_redis.proc.kill()  # type: ignore[union-attr]
        own_redis.proc.wait()  # type: ignore[union-attr]
        crashed = time.monotonic()
        res = await in_flight
        assert time.monotonic() - crashed < 5, "the in-flight stream must end promptly"
        await tally(outcome, [res], [""])
        assert res.error is not None and res.chunks > 0 and res.done, res
        assert res.error["code"] in ("reply_lost", "worker_timeout"), res.error

        own_redis.start()
        restarted = time.monotonic()
        reply = await wait_for(lambda: _try_chat(gw.url, "after the storm"), timeout=15, interval=0.2)
        outcome.requests += 1
        outcome.ok += reply == "".join(echo_tokens("after the storm", 8))
        assert time.monotonic() - restarted < 10
        assert outcome.ok == 1
    finally:
        await stack.close()


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
    body = ('{"model": "echo", "messages": [{"role": "user", "content": "%s"}], "stream": true}' % word).encode()
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
