"""Benchmark redserve itself: private Redis + N echo workers + one gateway, as separate processes.

    python -m bench.redserve_stack --workers 1 --delay 0 -c 1 16 64 -n 200 --max-tokens 64
    python -m bench.redserve_stack --engine hf --model-path /tmp/tiny -c 1 8 -n 32 --max-tokens 128

Prints one line per concurrency with the load generator's figures and the CPU
seconds the serving processes (gateway, workers, Redis) spent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import httpx

from bench.loadgen import run
from broker.settings import Settings
from redserve.redis_server import RedisServer, free_port


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """The process's high-water resident set (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--engine", default="echo", choices=["echo", "hf"])
    p.add_argument("--model-path", default=None, help="hf: the model directory (redserve tiny-model DIR)")
    p.add_argument("--delay", type=float, default=0.0, help="seconds between echo tokens")
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("-n", "--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args()

    with RedisServer() as redis:
        port = free_port()
        s = Settings(redis_url=redis.url, port=port, echo_tokens=a.max_tokens, echo_delay=a.delay,
                     max_concurrency=1024)
        env = os.environ | s.to_env()
        py = [sys.executable, "-m", "redserve"]
        model = "echo" if a.engine == "echo" else "tiny"
        worker = [*py, "worker", "--log-level", "warning", "--engine", a.engine, "--model", model]
        if a.model_path:
            worker += ["--model-path", a.model_path]
        procs = [subprocess.Popen(worker, env=env) for _ in range(a.workers)]
        procs.append(subprocess.Popen([*py, "gateway", "--log-level", "warning"], env=env))
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):  # an hf worker loads torch first
                try:
                    if httpx.get(f"{url}/v1/models").json()["data"][0]["workers"] == a.workers:
                        break
                except Exception:
                    pass
                time.sleep(0.1)
            pids = [pr.pid for pr in procs] + [redis.proc.pid]  # type: ignore[union-attr]
            for c in a.concurrency:
                before = sum(cpu_seconds(pid) for pid in pids)
                res = asyncio.run(run(url, model, c, max(a.requests, c), a.max_tokens))
                cpu = sum(cpu_seconds(pid) for pid in pids) - before
                print(json.dumps({"system": "redserve", "engine": a.engine, "workers": a.workers,
                                  "delay_ms": a.delay * 1000,
                                  "concurrency": c, **{k: round(v, 2) for k, v in res.summary().items()},
                                  "server_cpu_s": round(cpu, 2),
                                  "gateway_peak_rss_mb": round(peak_rss_mb(procs[-1].pid), 1)}), flush=True)
                for e in res.errors[:3]:
                    print("  error:", e)
        finally:
            for pr in procs:
                pr.terminate()
            for pr in procs:
                pr.wait(30)


if __name__ == "__main__":
    main()
