"""The Python API: enqueue chat, completion and embedding requests with BatchClient, follow, abort; and
interactive requests first while a batch runs (batch jobs only fill their share of the workers)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from batchkit import running_runner, time_to_first_token
from support import wait_for

from broker.batch import BatchClient, BatchJobError, JobState
from workers.echo import echo_tokens


def reply(text: str, n: int) -> str:
    return "".join(echo_tokens(text, n))


async def test_chat_completion_and_embedding_jobs(stack, settings, batches: BatchClient):
    await stack.worker(["echo"])
    chat = await batches.enqueue_chat(model="echo", messages=[{"role": "user", "content": "hello batch"}],
                                      max_tokens=4)
    completion = await batches.enqueue_completion(model="echo", prompt="some prompt words", max_tokens=3)
    embedding = await batches.enqueue_embedding(model="echo", input="no vectors here")
    unknown = await batches.enqueue_chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert await chat.status() is JobState.QUEUED  # no runner yet
    async with running_runner(settings):
        result = await chat.result(timeout=10)
        assert result["object"] == "chat.completion" and result["model"] == "echo"
        assert result["choices"][0]["message"] == {"role": "assistant", "content": reply("hello batch", 4)}
        assert result["usage"]["completion_tokens"] == 4
        text = await completion.result(timeout=10)
        assert text["object"] == "text_completion" and text["choices"][0]["text"] == reply("some prompt words", 3)
        with pytest.raises(BatchJobError) as refused:  # the echo engine does not embed: the gateway's own 400
            await embedding.result(timeout=10)
        assert refused.value.status_code == 400 and refused.value.error["message"]
        with pytest.raises(BatchJobError) as missing:
            await unknown.result(timeout=10)
        assert missing.value.status_code == 404 and missing.value.error["code"] == "model_not_found"
    assert await chat.status() is JobState.COMPLETED
    assert await embedding.status() is JobState.FAILED
    with pytest.raises(LookupError):
        await batches.job("no-such-job").result(timeout=1)
    with pytest.raises(ValueError):
        await batches.enqueue("/v1/images", {"model": "echo"})


async def test_enqueue_many_and_each_result_stored_once(stack, settings, redis, keys, batches: BatchClient):
    worker = await stack.worker(["echo"])
    prompts = [f"many {i}" for i in range(40)]
    jobs = await batches.enqueue_many(
        {"url": "/v1/chat/completions", "job_id": f"many-{i}",
         "body": {"model": "echo", "messages": [{"role": "user", "content": p}], "max_tokens": 2}}
        for i, p in enumerate(prompts))
    async with running_runner(settings):
        results = await asyncio.gather(*(j.result(timeout=20) for j in jobs))
        assert [r["choices"][0]["message"]["content"] for r in results] == [reply(p, 2) for p in prompts]
        # arq runs a job again (say its runner died after storing the result): nothing runs, the result stays
        await batches.enqueue_chat(model="echo", messages=[{"role": "user", "content": "other"}], job_id="many-0")
        await wait_for(lambda: _gone(redis, keys, "many-0"), timeout=10)
        assert (await jobs[0].result(timeout=1))["id"] == results[0]["id"]
        assert worker.record.jobs_done == 40


async def _gone(redis, keys, job_id: str) -> bool:  # noqa: ANN001
    return await redis.zscore(keys.batch_queue(), job_id) is None


async def test_abort_stops_a_running_job(stack, settings, batches: BatchClient):
    worker = await stack.worker(["echo"], echo_delay=0.1, echo_tokens=100)
    async with running_runner(settings):
        job = await batches.enqueue_chat(model="echo", messages=[{"role": "user", "content": "long one"}])
        await wait_for(lambda: worker.tasks, timeout=10)
        assert await job.status() is JobState.IN_PROGRESS
        assert await job.abort() is True
        with pytest.raises(BatchJobError) as aborted:
            await job.result(timeout=1)
        assert aborted.value.error["code"] == "cancelled"
        await wait_for(lambda: not worker.tasks, timeout=5)  # the runner stopped it, the worker let go
        assert worker.record.tokens_out < 100
        assert await job.status() is JobState.ABORTED
        done = await batches.enqueue_chat(model="echo", messages=[{"role": "user", "content": "x"}], max_tokens=1)
        await done.result(timeout=10)
        assert await done.abort() is False  # already finished
        assert await batches.abort("no-such-job") is False


async def test_batch_jobs_leave_room_for_interactive_requests(stack, settings, redis_url, keys,
                                                               batches: BatchClient):
    """batch_share 0.5 of max_concurrency 4: batch jobs never hold more than 2 slots, so an interactive
    request starts at once instead of queueing behind batch jobs that each run for 10 s."""
    await stack.worker(["echo"], worker_id="w", max_concurrency=4, echo_delay=0.05, echo_tokens=200)
    gw = await stack.gateway()
    interactive = keys.replies(gw.server.config.app.state.broker.router.gateway_id).encode()  # type: ignore
    raw = aioredis.Redis.from_url(redis_url)  # job payloads are msgpack
    jobs = await batches.enqueue_many(  # 6 jobs would fill every seat and queue 2 more without the share
        {"url": "/v1/chat/completions", "body": {"model": "echo", "messages": [{"role": "user", "content": f"b {i}"}]}}
        for i in range(6))
    peak = 0

    async def watch() -> None:  # batch jobs on the worker's stream (running + waiting), sampled throughout
        nonlocal peak
        while True:
            entries = await raw.xrange(keys.jobs("echo", "w"))
            peak = max(peak, sum(fields[b"reply_to"] != interactive for _, fields in entries))
            await asyncio.sleep(0.005)

    async with running_runner(settings, batch_share=0.5):
        watcher = asyncio.create_task(watch())
        await wait_for(lambda: peak, timeout=10)
        ttfts = []
        for _ in range(4):
            ttfts.append(await time_to_first_token(gw.url))
        await asyncio.sleep(0.5)  # the runner has had time to place more than its share, were it going to
        watcher.cancel()
        assert [await j.abort() for j in jobs] == [True] * 6  # none finished: each runs for 10 s
    await raw.aclose()
    assert peak == 2, peak
    # a first token takes 0.05 s; an interactive request queued behind a batch job would wait about 10 s
    assert max(ttfts) < 3, ttfts
