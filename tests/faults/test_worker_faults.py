"""Workers that die (SIGKILL), drain (SIGTERM), restart one by one, or get jobs nobody waits for."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import redis.asyncio as aioredis
from faultkit import stream_chat, tally
from support import wait_for

from workers.echo import echo_tokens


def reply(text: str, n: int = 8) -> str:
    return "".join(echo_tokens(text, n))


async def until_queued(redis, keys, wid: str, n: int) -> None:  # noqa: ANN001
    await wait_for(lambda: _xlen_at_least(redis, keys.jobs("echo", wid), n), timeout=10)


async def _xlen_at_least(redis, key: str, n: int) -> bool:  # noqa: ANN001
    return await redis.xlen(key) >= n


async def test_worker_killed_with_queued_jobs(stack, redis, keys, outcome):
    """Jobs waiting in a dead worker's stream move to a live worker; the running one is retried
    transparently because its (non-streaming) client has seen nothing yet."""
    doomed = stack.spawn_worker("doomed", echo_delay=0.2, max_concurrency=1, max_queue=16)
    await wait_for(lambda: redis.exists(keys.worker("doomed")))
    gw = await stack.gateway()
    client = gw.client(timeout=30)
    prompts = [f"queued job {i}" for i in range(6)]
    calls = [asyncio.create_task(client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": p}])) for p in prompts]
    await until_queued(redis, keys, "doomed", 6)
    survivor = await stack.worker(worker_id="survivor", max_concurrency=8)
    doomed.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    results = await asyncio.gather(*(asyncio.wait_for(c, 30) for c in calls), return_exceptions=True)
    texts = [r.choices[0].message.content if hasattr(r, "choices") else r for r in results]
    await tally(outcome, texts, [reply(p) for p in prompts])
    assert outcome.ok == 6, outcome
    assert survivor.record.jobs_done == 6
    janitor = stack.gateways[0].server.config.app.state.broker.janitor  # type: ignore[attr-defined]
    assert janitor.moved == 5 and janitor.lost == 1
    outcome.retried = janitor.moved + janitor.lost
    assert time.monotonic() - killed < 2 + 5  # TTL 2 s + janitor sweep + the replies themselves
    assert not await redis.exists(keys.jobs("echo", "doomed"))
    assert "doomed" not in await redis.hkeys(keys.workers())


async def test_worker_killed_mid_stream(stack, redis, keys, outcome, settings):
    """A client that already received tokens gets a clean error and [DONE], within TTL + a few seconds."""
    doomed = stack.spawn_worker("doomed", echo_delay=0.1, echo_tokens=200, max_concurrency=1)
    await wait_for(lambda: redis.exists(keys.worker("doomed")))
    gw = await stack.gateway()
    started = asyncio.create_task(stream_chat(gw.url, "cut short"))
    await wait_for(lambda: _xlen_at_least(redis, keys.jobs("echo", "doomed"), 1))
    waiting = asyncio.create_task(stream_chat(gw.url, "never started"))  # queued behind it: nothing sent yet
    await until_queued(redis, keys, "doomed", 2)
    await asyncio.sleep(0.5)  # a few tokens of the first reach its client
    await stack.worker(worker_id="survivor")
    doomed.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    first, second = await asyncio.gather(started, waiting, return_exceptions=True)
    elapsed = time.monotonic() - killed
    await tally(outcome, [first, second], ["", reply("never started")])
    outcome.retried = 1
    assert first.chunks > 0 and first.error["code"] == "worker_lost" and first.done, first
    assert second.content == reply("never started") and second.error is None
    assert elapsed < settings.worker_ttl + 4, elapsed


async def test_job_dead_lettered_after_max_attempts(stack, redis, redis_url, keys, outcome):
    """A job whose workers keep dying is retried, then dead-lettered with a clean 503."""
    gw = await stack.gateway(max_attempts=2, reply_timeout=30)
    client = gw.client(timeout=40)
    call = None
    for attempt in range(2):
        wid = f"victim-{attempt}"
        w = stack.spawn_worker(wid, echo_delay=0.2, echo_tokens=200)
        await wait_for(lambda wid=wid: redis.exists(keys.worker(wid)))
        if call is None:
            call = asyncio.create_task(client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "cursed"}]))
        await wait_for(lambda wid=wid: _xlen_at_least(redis, keys.jobs("echo", wid), 1), timeout=15)
        await asyncio.sleep(0.3)  # running
        w.send_signal(signal.SIGKILL)
    try:
        await asyncio.wait_for(call, 30)
        outcome.lost += 1
    except Exception as exc:  # noqa: BLE001 - the official client's APIStatusError
        assert getattr(exc, "status_code", None) == 503 and "dead-lettered" in str(exc), exc
        outcome.clean_errors += 1
    outcome.requests, outcome.retried = 1, 1
    raw = aioredis.Redis.from_url(redis_url)
    [(_, fields)] = await raw.xrange(keys.dead_letters())
    await raw.aclose()
    assert fields[b"model"] == b"echo" and fields[b"attempt"] == b"2" and b"died" in fields[b"reason"]


async def test_client_disconnect_stops_the_worker(stack, redis, keys, outcome):
    w = await stack.worker(worker_id="w", echo_delay=0.1, echo_tokens=100)
    gw = await stack.gateway()
    res = await stream_chat(gw.url, "hang up on me", stop_after=3)
    hung_up = time.monotonic()
    await wait_for(lambda: not w.tasks, timeout=3)
    outcome.requests, outcome.clean_errors = 1, 1
    assert time.monotonic() - hung_up < 0.5
    assert await redis.zscore(keys.model_workers("echo"), "w") == 0
    assert res.chunks == 3 and w.record.tokens_out <= 5


async def test_cancel_by_id_from_another_gateway(stack, redis, keys, outcome):
    w = await stack.worker(worker_id="w", echo_delay=0.1, echo_tokens=100)
    holder, other = await stack.gateway(), await stack.gateway()
    running = asyncio.create_task(stream_chat(holder.url, "cancel me by id"))
    await wait_for(lambda: w.record.tokens_out >= 2)  # mid-stream: the client has tokens already
    rid = next(iter(w.tasks))
    async with httpx.AsyncClient(base_url=other.url) as http:
        r = await http.post(f"/v1/requests/chatcmpl-{rid}/cancel")
        assert r.status_code == 200 and r.json()["worker"] == "w"
        res = await asyncio.wait_for(running, 3)
        missing = await http.post("/v1/requests/chatcmpl-nope/cancel")
    await tally(outcome, [res], [""])
    assert res.error["code"] == "cancelled" and res.done and res.id == f"chatcmpl-{rid}"
    await wait_for(lambda: not w.tasks, timeout=2)  # the job retires right after it said "cancelled"
    assert w.record.tokens_out < 20
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"


async def test_job_past_its_deadline_is_not_run(stack, redis, keys, outcome):
    w = await stack.worker(worker_id="w", echo_delay=0.25, max_concurrency=1)  # 2 s per job
    patient, impatient = await stack.gateway(), await stack.gateway(reply_timeout=0.5)
    first = asyncio.create_task(stream_chat(patient.url, "long job"))
    await wait_for(lambda: w.tasks)
    late = await stream_chat(impatient.url, "too late")  # gives up after 0.5 s, while queued
    await tally(outcome, [await first, late], [reply("long job"), ""])
    assert late.error["code"] == "worker_timeout"
    await wait_for(lambda: w.record.jobs_done == 2, timeout=5)
    assert w.record.tokens_out == 8  # the expired job was retired without generating


async def test_gateway_gone_its_jobs_are_not_generated(stack, redis, keys, outcome):
    w = await stack.worker(worker_id="w", echo_delay=0.1, echo_tokens=100, max_concurrency=1)
    gw = await stack.gateway()
    calls = [asyncio.create_task(stream_chat(gw.url, f"orphan {i}", timeout=5)) for i in range(3)]
    await until_queued(redis, keys, "w", 3)
    gw.server.should_exit = True  # type: ignore[attr-defined]
    gw.server.force_exit = True  # type: ignore[attr-defined]
    await asyncio.wait_for(gw.task, 10)
    stack.gateways.remove(gw)
    for c in calls:
        c.cancel()
    await wait_for(lambda: not w.tasks and w.record.jobs_done == 3, timeout=5)
    outcome.requests, outcome.clean_errors = 3, 3
    assert w.record.tokens_out < 30  # nobody listened: the running job stopped, the queued ones never ran


async def test_rolling_restart_under_load(stack, redis, keys, outcome):
    procs = {wid: stack.spawn_worker(wid, echo_delay=0.01, max_concurrency=4) for wid in ("r1", "r2")}
    for wid in procs:
        await wait_for(lambda wid=wid: redis.exists(keys.worker(wid)))
    gw = await stack.gateway()
    stop = asyncio.Event()
    results: list = []
    expected: list[str] = []

    async def lane(i: int) -> None:
        n = 0
        while not stop.is_set():
            prompt = f"lane {i} request {n}"
            result = await stream_chat(gw.url, prompt)
            results.append(result)
            expected.append(reply(prompt))
            n += 1

    lanes = [asyncio.create_task(lane(i)) for i in range(4)]
    for wid in list(procs):
        procs[wid].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(procs[wid].wait, 20) == 0
        new = f"{wid}-new"
        stack.spawn_worker(new, echo_delay=0.01, max_concurrency=4)
        await wait_for(lambda new=new: redis.exists(keys.worker(new)))
        await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*lanes)
    await tally(outcome, results, expected)
    assert outcome.requests >= 20 and outcome.ok == outcome.requests, outcome
