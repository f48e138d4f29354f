"""The least-privilege ACL that docs/redis.md documents: a stack runs through it, and workers are fenced in."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from batchkit import spawn_runner
from redis.exceptions import NoPermissionError
from support import Stack, wait_for

from broker.batch import BatchClient
from redserve.redis_server import RedisServer, free_port
from workers.echo import echo_tokens

DOC = Path(__file__).parent.parent / "docs" / "redis.md"


def acl_lines() -> list[list[str]]:
    block = re.search(r"```acl\n(.*?)```", DOC.read_text(), flags=re.S)
    assert block, "docs/redis.md lost its ACL block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


@pytest.fixture
async def acl_redis(tmp_path):
    server = RedisServer(free_port(), directory=str(tmp_path)).start()
    admin = aioredis.Redis.from_url(server.url)
    for words in acl_lines():
        await admin.execute_command(*words)
    await admin.aclose()
    yield server
    server.close()


def url(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


async def test_stack_runs_with_least_privilege_users(acl_redis, settings):
    worker_url = url(acl_redis, "redserve-worker", "worker-secret")
    gateway_url = url(acl_redis, "redserve-gateway", "gateway-secret")
    stack = Stack(settings.model_copy(update={"redis_url": gateway_url}))
    try:
        proc = stack.spawn_worker("fenced", redis_url=worker_url, echo_delay=0.01)
        gw = await stack.gateway()
        await wait_for(lambda: _models(gw.client()), timeout=15)
        client = gw.client()
        r = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "acl ok"}])
        assert r.choices[0].message.content == "".join(echo_tokens("acl ok", 8))
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "acl stream"}], stream=True,
            stream_options={"include_usage": True, "resumable": True})
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == \
            "".join(echo_tokens("acl stream", 8))
        assert proc.poll() is None  # the worker never tripped over a missing permission
        runner = spawn_runner(stack.settings, redis_url=url(acl_redis, "redserve-batch-runner", "runner-secret"))
        stack.procs.append(runner)
        async with BatchClient(stack.settings.redis_url, stack.settings) as batch:
            job = await batch.enqueue_chat(model="echo", messages=[{"role": "user", "content": "acl batch"}])
            result = await job.result(timeout=30)
        assert result["choices"][0]["message"]["content"] == "".join(echo_tokens("acl batch", 8))
        assert runner.poll() is None
    finally:
        await stack.close()


async def test_worker_user_cannot_touch_what_is_not_its_own(acl_redis):
    worker = aioredis.Redis.from_url(url(acl_redis, "redserve-worker", "worker-secret"), decode_responses=True)
    try:
        for attempt in (worker.get("redserve:rate:k:1:requests"), worker.xadd("redserve:deadletter", {"a": "b"}),
                        worker.xadd("redserve:votes", {"a": "b"}), worker.flushall(), worker.keys("*"),
                        worker.config_get("*"), worker.set("other:thing", "1")):
            with pytest.raises(NoPermissionError):
                await attempt
    finally:
        await worker.aclose()
    with pytest.raises(redis.exceptions.RedisError):  # a wrong password is refused outright
        bad = aioredis.Redis.from_url(url(acl_redis, "redserve-worker", "guess"))
        try:
            await bad.ping()
        finally:
            await bad.aclose()


async def _models(client) -> bool:  # noqa: ANN001
    return bool((await client.models.list()).data)
