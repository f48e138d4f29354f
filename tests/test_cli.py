"""The commands a user types: `redserve up`, `redserve status`, `--help`, as real processes."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import time

import httpx
from openai import OpenAI
from support import run_redserve, shut_down, spawn_redserve, wait_for, wait_models

from broker.keys import Keys
from redserve.redis_server import free_port


def test_every_command_explains_its_flags():
    for cmd in ["up", "gateway", "worker", "status", "tiny-model", "leaderboard", "export"]:
        out = run_redserve(cmd, "--help").stdout
        flags = set(re.findall(r"(--[a-z][a-z-]+)", out)) - {"--help"}
        assert flags, cmd
        for flag in flags:  # each flag has help text after it somewhere in the listing
            assert re.search(rf"{flag}(?: [A-Z_{{}},]+)?\s+\S", out), (cmd, flag)


def test_gateway_and_worker_refuse_to_start_without_redis():
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDSERVE_REDIS_URL")}
    r = run_redserve("worker", "--engine", "echo", "--model", "m", env=env)
    assert r.returncode != 0 and "REDIS_URL" in r.stderr


def start_up(*args: str, workers: int = 1) -> tuple[subprocess.Popen[str], str, list[str]]:
    """`redserve up ARGS` without REDIS_URL; returns once its models have `workers` live workers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDSERVE_REDIS_URL")}
    proc = spawn_redserve("up", "--port", str(port), "--workers", str(workers), "--log-level", "warning", *args,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    seen = wait_models(base, lambda seen: workers in seen.values(), watch=proc)
    return proc, base, [model for model, n in seen.items() if n == workers]


def stop(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C, as a person stops `redserve up`: it exits 0; returns what it printed."""
    (done,) = shut_down(proc, sig=signal.SIGINT, timeout=60)
    assert done.returncode == 0, done.stdout
    return done.stdout


def test_tiny_model_command_then_up_serves_it_with_the_hf_engine(tmp_path):
    built = run_redserve("tiny-model", str(tmp_path / "tiny"), timeout=120)
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "tiny" / "config.json").exists() and (tmp_path / "tiny" / "tokenizer.json").exists()
    proc, base, models = start_up("--engine", "hf", "--model", str(tmp_path / "tiny"))
    try:
        assert models == ["tiny"]  # served under the folder's name
        client = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == 8
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finally:
        stop(proc)


def test_up_starts_private_redis_gateway_and_worker_then_stops_cleanly(tmp_path):
    proc, base, models = start_up(workers=2)
    try:
        assert models == ["echo"]
        client = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi there"}],
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).startswith("hi there")
        assert httpx.get(f"{base}/", timeout=2).status_code == 200  # the UI is served
        # `up` starts a batch runner too, so the Batch API works out of the box.
        line = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": ' \
               b'{"model": "echo", "messages": [{"role": "user", "content": "batch hi"}]}}'
        batch = client.batches.create(input_file_id=client.files.create(file=("b.jsonl", line), purpose="batch").id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 30
        while batch.status != "completed" and time.monotonic() < deadline:
            time.sleep(0.2)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 1
    finally:
        out = stop(proc)
    assert "redserve is up" in out and "private Redis at redis://127.0.0.1:" in out
    redis_port = int(re.search(r"private Redis at redis://127.0.0.1:(\d+)", out).group(1))
    # Everything it started is gone: the private Redis no longer answers.
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", redis_port)) != 0


async def test_status_prints_live_workers(stack, redis_url):
    await stack.worker(["echo", "other"], worker_id="w-status")
    r = run_redserve("status", "--redis-url", redis_url)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.strip().splitlines()
    assert header.split()[:3] == ["WORKER", "ID", "MODELS"]
    assert len(rows) == 1 and rows[0].split()[:4] == ["w-status", "echo,other", "echo", "ready"]


async def test_inspect_says_where_a_request_is(stack, redis_url):
    import asyncio

    w = await stack.worker(["echo"], worker_id="w-inspect", echo_delay=0.6, max_concurrency=1)  # a job lasts ~5 s
    gw = await stack.gateway(reply_timeout=60)  # the third waits two jobs for its first token
    client = gw.client()
    calls = [asyncio.create_task(client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": f"inspect {i}"}])) for i in range(3)]
    while len(w.tasks) < 1:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    running = next(iter(w.tasks))

    def inspect(rid: str) -> subprocess.CompletedProcess[str]:
        return run_redserve("inspect", f"chatcmpl-{rid}", "--redis-url", redis_url)

    r = await asyncio.to_thread(inspect, running)
    assert r.returncode == 0 and f"{running}: running on worker w-inspect" in r.stdout, r.stdout
    import redis.asyncio as aioredis

    raw = aioredis.Redis.from_url(redis_url)
    try:  # all three placed (the first runs, two wait), however loaded the machine is
        async def all_placed() -> bool:
            return await raw.xlen(Keys().jobs("echo", "w-inspect")) == 3

        await wait_for(all_placed)
        entries = await raw.xrange(Keys().jobs("echo", "w-inspect"))
    finally:
        await raw.aclose()
    queued = [f[b"request_id"].decode() for _, f in entries if f[b"request_id"].decode() != running]
    r = await asyncio.to_thread(inspect, queued[-1])
    assert "queued on worker w-inspect, 2 of 2 waiting" in r.stdout, r.stdout
    await asyncio.gather(*calls)
    r = await asyncio.to_thread(inspect, running)
    assert "finished" in r.stdout
    r = await asyncio.to_thread(inspect, "nope")
    assert r.returncode == 1 and "unknown" in r.stdout


def test_processes_run_on_uvloop_unless_told_otherwise():
    import asyncio

    from redserve import loop

    async def kind() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert loop.run(kind()) == "uvloop"  # a dependency (uvicorn[standard]) on Linux
    assert loop.run(kind(), "asyncio") == "asyncio"
    assert "--event-loop" in run_redserve("gateway", "--help").stdout


async def test_gateway_processes_share_one_port_and_a_dead_one_is_replaced(stack, redis_url):
    import asyncio

    import redis.asyncio as aioredis

    await stack.worker(max_concurrency=32)
    port = free_port()
    env = os.environ | {"REDIS_URL": redis_url}
    group = spawn_redserve("gateway", "--gateway-processes", "2", "--port", str(port), "--log-level", "warning",
                           env=env)
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)

    async def reply_channels() -> list[str]:
        return sorted(await raw.pubsub_channels("redserve:replies:*"))

    async def wait_channels(n: int, other_than: list[str] | None = None) -> list[str]:
        for _ in range(300):
            chans = await reply_channels()
            if len(chans) == n and chans != other_than:
                return chans
            await asyncio.sleep(0.1)
        raise AssertionError(f"reply channels: {await reply_channels()}")

    async def served(n: int) -> int:
        """Streams answered in full on the one port (/health no longer says which gateway answered)."""
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            async def one() -> bool:
                async with http.stream("POST", "/v1/chat/completions", json={
                        "model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
                    return r.status_code == 200 and (await r.aread()).endswith(b"data: [DONE]\r\n\r\n")
            return sum(await asyncio.gather(*(one() for _ in range(n))))

    try:
        first = await wait_channels(2)  # two gateways, each with its own reply channel
        assert await served(40) == 40  # all answered on the one port
        children = [int(p) for p in open(f"/proc/{group.pid}/task/{group.pid}/children").read().split()]
        os.kill(children[0], signal.SIGKILL)
        replaced = await wait_channels(2, other_than=first)  # the supervisor started a replacement
        assert len(set(replaced) & set(first)) == 1
        assert await served(10) == 10
    finally:
        assert [p.returncode for p in await asyncio.to_thread(shut_down, group)] == [0]
        await raw.aclose()
    assert await asyncio.wait_for(wait_channels(0), 10) == []


def test_up_with_two_gateway_processes_serves_on_one_port():
    import redis as sync_redis

    proc, base, models = start_up("--gateway-processes", "2", "--no-batch-runner")
    try:
        assert models == ["echo"]
        client = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        for _ in range(4):
            assert client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
        url = re.search(r"private Redis at (redis://\S+)", proc.stdout.readline() + "".join(
            proc.stdout.readline() for _ in range(6))).group(1)
        with sync_redis.Redis.from_url(url) as r:  # one reply channel per gateway process (the second may start later)
            deadline = time.monotonic() + 30
            while len(r.pubsub_channels("redserve:replies:*")) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(r.pubsub_channels("redserve:replies:*")) == 2
    finally:
        stop(proc)


def test_a_bad_setting_is_named_not_a_traceback():
    r = run_redserve("worker", "--engine", "echo", "--model", "m", "--redis-url", "redis://127.0.0.1:1",
                     "--max-concurrency", "0")
    assert r.returncode == 2 and "--max-concurrency" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_redserve("gateway", env=os.environ | {"REDSERVE_MAX_BODY_BYTES": "-5"})
    assert r.returncode == 2 and "REDSERVE_MAX_BODY_BYTES" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_every_setting_is_a_flag_of_some_process():
    """Flags come from the settings' own metadata: a new field without roles would be unreachable from the
    command line, so this catches it; and each role's flags are exactly its fields."""
    from broker.settings import Settings, fields_for
    from redserve.cli import build_parser

    every = fields_for("redis", "worker", "gateway", "batch-runner")
    assert [name for name in Settings.model_fields if name not in every] == []
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, roles in {"gateway": ("redis", "gateway"), "worker": ("redis", "worker"),
                           "batch-runner": ("redis", "batch-runner"), "status": ("redis",)}.items():
        flags = {a.dest for a in sub.choices[command]._actions if a.dest in Settings.model_fields}
        assert flags == set(fields_for(*roles)), command
