"""Interactive time to first token with and without a running batch, on the same echo workers.

    python -m bench.batch_interference --requests 5000 --workers 2 --max-concurrency 8 --delay 0.005 \\
        --rate 20 --seconds 15 --ungated

A private Redis, the echo workers, one gateway and (for the batch phases) one
batch runner, each its own process. Interactive load: streamed chat requests
arriving at ``--rate`` per second (open loop) for ``--seconds``, through the
gateway. Phases, one JSON line each:

- ``alone``: the interactive load only;
- ``batch``: the same while a batch of ``--requests`` runs (``batch_share`` 0.75);
- ``ungated`` (with ``--ungated``): the same with ``batch_share`` so high that
  batch jobs fill every worker queue, to show what the share protects.

The interactive load starts once the batch is under way and must end before
the batch does (``batch_ran_throughout``). Each batch phase then waits for its
batch and checks every ``custom_id`` is in the output exactly once, so
``--requests 10000 --seconds 5`` is the 10,000-request scale check too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx

from bench.loadgen import Result, one
from broker.batch import BatchClient
from broker.settings import Settings
from redserve.redis_server import RedisServer, free_port


async def interactive(url: str, rate: float, seconds: float, max_tokens: int) -> Result:
    """Open loop: a new streamed request every 1/rate s, whatever the earlier ones are doing."""
    res = Result()
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0),
                                 limits=httpx.Limits(max_connections=1000)) as http:
        start = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(http, "echo", max_tokens, i, res)))
        await asyncio.gather(*tasks)
        res.wall = time.perf_counter() - start
    return res


def batch_file(n: int, max_tokens: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"job-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "echo", "max_tokens": max_tokens,
                                        "messages": [{"role": "user", "content": f"batch request {i}"}]}}) + "\n"
                   for i in range(n)).encode()


async def settled(client: BatchClient, batch_id: str) -> tuple[str, int]:
    b = await client.batch(batch_id)
    return b["status"], b["request_counts"]["completed"] + b["request_counts"]["failed"]


async def phase(name: str, a: argparse.Namespace, url: str, settings: Settings,
                share: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {"phase": name}
    runner = client = batch_id = None
    if share is not None:
        env = os.environ | settings.model_copy(update={"batch_share": share}).to_env()
        runner = subprocess.Popen([sys.executable, "-m", "redserve", "batch-runner", "--log-level", "warning"], env=env)
        client = BatchClient(settings.resolved_redis_url(), settings)
        uploaded = await client.create_file(batch_file(a.requests, a.max_tokens), filename="bench.jsonl")
        created = time.perf_counter()
        batch_id = (await client.create_batch(input_file_id=uploaded["id"], endpoint="/v1/chat/completions"))["id"]
        while (await settled(client, batch_id))[1] < min(200, a.requests // 10):
            await asyncio.sleep(0.05)
        _, before = await settled(client, batch_id)
    started = time.perf_counter()
    res = await interactive(url, a.rate, a.seconds, a.max_tokens)
    row.update({k: round(v, 2) for k, v in res.summary().items()
                if k in ("requests", "errors", "ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms")})
    if client is not None and batch_id is not None and runner is not None:
        status, after = await settled(client, batch_id)
        row["batch_ran_throughout"] = status == "in_progress" and after < a.requests
        row["batch_jobs_per_s_meanwhile"] = round((after - before) / (time.perf_counter() - started), 1)
        while status not in ("completed", "failed", "expired", "cancelled"):
            await asyncio.sleep(0.2)
            status, _ = await settled(client, batch_id)
        batch = await client.batch(batch_id)
        row["batch_s"] = round(time.perf_counter() - created, 1)
        row["batch_status"] = batch["status"]
        row["batch_counts"] = batch["request_counts"]
        out = [json.loads(line) for line in (await client.file_content(batch["output_file_id"])).splitlines()] \
            if batch["output_file_id"] else []
        seen = Counter(o["custom_id"] for o in out)
        row["every_custom_id_once"] = len(seen) == a.requests and max(seen.values(), default=0) == 1
        await client.close()
        runner.send_signal(signal.SIGTERM)
        runner.wait(30)
    for e in res.errors[:3]:
        print("  error:", e, file=sys.stderr)
    return row


async def bench(a: argparse.Namespace, url: str, settings: Settings) -> None:
    phases = [("alone", None), ("batch", 0.75)] + ([("ungated", 1000.0)] if a.ungated else [])
    for name, share in phases:
        print(json.dumps(await phase(name, a, url, settings, share)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=5000, help="batch size [5000]")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-concurrency", type=int, default=8, help="per worker [8]")
    p.add_argument("--delay", type=float, default=0.005, help="seconds between echo tokens [0.005]")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request, interactive and batch [16]")
    p.add_argument("--rate", type=float, default=20.0, help="interactive requests per second [20]")
    p.add_argument("--seconds", type=float, default=15.0, help="interactive load duration [15]")
    p.add_argument("--ungated", action="store_true", help="also run with batch_share out of the way")
    a = p.parse_args()

    with RedisServer() as redis:
        port = free_port()
        s = Settings(redis_url=redis.url, port=port, echo_tokens=a.max_tokens, echo_delay=a.delay,
                     max_concurrency=a.max_concurrency)
        env = os.environ | s.to_env()
        py = [sys.executable, "-m", "redserve"]
        procs = [subprocess.Popen([*py, "worker", "--log-level", "warning", "--engine", "echo", "--model", "echo"],
                                  env=env) for _ in range(a.workers)]
        procs.append(subprocess.Popen([*py, "gateway", "--log-level", "warning"], env=env))
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/v1/models").json()["data"][0]["workers"] == a.workers:
                        break
                except Exception:
                    pass
                time.sleep(0.1)
            print(json.dumps({"workers": a.workers, "max_concurrency": a.max_concurrency, "delay_ms": a.delay * 1000,
                              "max_tokens": a.max_tokens, "rate": a.rate, "seconds": a.seconds,
                              "batch_requests": a.requests, "cpus": os.cpu_count()}), flush=True)
            asyncio.run(bench(a, url, s))
        finally:
            for pr in procs:
                pr.terminate()
            for pr in procs:
                pr.wait(30)


if __name__ == "__main__":
    main()
