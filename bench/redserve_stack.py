"""Benchmark redserve itself: private Redis + N echo workers + one gateway, as separate processes.

    python -m bench.redserve_stack --workers 1 --delay 0 -c 1 16 64 -n 200 --max-tokens 64
    python -m bench.redserve_stack --engine hf --model-path /tmp/tiny -c 1 8 -n 32 --max-tokens 128

Prints one line per concurrency with the load generator's figures and the CPU
seconds the serving processes (gateway, workers, Redis) spent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis as SyncRedis

from bench.loadgen import run
from broker.settings import Settings
from redserve.redis_server import RedisServer, free_port


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (a gateway group's children, say)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in descendants(pid):
        try:
            total += cpu_seconds(p)
        except OSError:  # exited meanwhile
            pass
    return total


def memory_mb(pid: int, field: str = "VmHWM") -> float:
    """A memory figure of the process from /proc, in MB: its high-water resident set (VmHWM) or now (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb(pid: int) -> float:
    return memory_mb(pid, "VmHWM")


@dataclass
class Stack:
    """A running system under test: where to send requests, and the processes whose CPU time counts."""

    url: str
    model: str
    pids: list[int]
    main_pid: int  # the process whose peak RSS is reported (redserve: the gateway)
    redis_url: str | None = None
    worker_metrics: list[str] = field(default_factory=list)

    def cpu(self) -> float:
        return sum(tree_cpu_seconds(pid) for pid in self.pids)

    def gateway_peak_rss_mb(self) -> float:
        """The largest peak RSS among the gateway processes (a group's supervisor only holds the socket)."""
        return max(peak_rss_mb(p) for p in descendants(self.main_pid))

    def counters(self) -> dict[str, float]:
        """Redis commands served (INFO commandstats) and the workers' reply messages; empty if not redserve."""
        if self.redis_url is None:
            return {}
        with SyncRedis.from_url(self.redis_url) as r:
            stats = r.info("commandstats")
        return {"redis_cmds": sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info"),
                **self.worker_sums({"redserve_worker_reply_messages_total": "reply_msgs",
                                    "redserve_worker_reply_commands_total": "reply_cmds"})}

    def worker_sums(self, names: dict[str, str]) -> dict[str, float]:
        """Samples of the workers' /metrics summed over the workers: metric sample name -> the key it gets."""
        out = dict.fromkeys(names.values(), 0.0)
        for url in self.worker_metrics:
            for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
                for sample in family.samples:
                    if sample.name in names:
                        out[names[sample.name]] += sample.value
        return out


def redis_use(before: dict[str, float], after: dict[str, float], tokens: int, chunks: int) -> dict[str, float]:
    """Redis commands per streamed message and per token over one run (empty when not measured)."""
    if not before:
        return {}
    d = {k: after[k] - before[k] for k in before}
    return {"reply_msgs": d["reply_msgs"], "reply_cmds": d["reply_cmds"], "redis_cmds": d["redis_cmds"],
            "reply_cmds_per_msg": d["reply_cmds"] / d["reply_msgs"] if d["reply_msgs"] else float("nan"),
            "redis_cmds_per_token": d["redis_cmds"] / tokens if tokens else float("nan"),
            "redis_cmds_per_chunk": d["redis_cmds"] / chunks if chunks else float("nan")}


def wait_ready_redis(port: int, tries: int = 100) -> None:
    """Until a replica reports its link to the master up."""
    for _ in range(tries):
        with SyncRedis(port=port) as r:
            if r.info("replication").get("master_link_status") == "up":
                return
        time.sleep(0.1)
    raise RuntimeError(f"replica on {port} never synced")


def wait_ready(url: str, ready, tries: int = 600, headers: dict[str, str] | None = None) -> None:  # noqa: ANN001
    for _ in range(tries):
        try:
            if ready(httpx.get(url, timeout=2, headers=headers)):
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"not ready: {url}")


def stop(procs: list[subprocess.Popen]) -> None:
    for pr in procs:
        pr.terminate()
    for pr in procs:
        try:
            pr.wait(30)
        except subprocess.TimeoutExpired:
            pr.kill()
            pr.wait()


@contextlib.contextmanager
def server_process(module_args: list[str], model: str = "echo") -> Iterator[Stack]:
    """A one-process server (``python -m MODULE ARGS --port P``), ready once /v1/models answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", *module_args, "--port", str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/v1/models", lambda r: r.status_code == 200)
        yield Stack(url, model, [proc.pid], proc.pid)
    finally:
        stop([proc])


@contextlib.contextmanager
def redserve(workers: int = 1, delay: float = 0.0, max_tokens: int = 64, engine: str = "echo",
             model_path: str | None = None, gateways: int = 1, extra: dict | None = None,
             replicas: int = 0) -> Iterator[Stack]:
    """Private Redis + ``workers`` echo (or hf) workers + a gateway (of ``gateways`` processes).

    ``extra``: more settings for every process (API keys and limits, say); ``replicas``: replicas of the
    private Redis (for the cost of ``replica_acks``)."""
    with RedisServer() as redis, contextlib.ExitStack() as more:
        for _ in range(replicas):
            replica = more.enter_context(RedisServer(extra_args=["--replicaof", "127.0.0.1", str(redis.port)]))
            wait_ready_redis(replica.port)
        port = free_port()
        s = Settings(**{"redis_url": redis.url, "port": port, "echo_tokens": max_tokens, "echo_delay": delay,
                        "max_concurrency": 1024, "gateway_processes": gateways, **(extra or {})})
        env = os.environ | s.to_env()
        py = [sys.executable, "-m", "redserve"]
        model = "echo" if engine == "echo" else "tiny"
        worker = [*py, "worker", "--log-level", "warning", "--engine", engine, "--model", model]
        if model_path:
            worker += ["--model-path", model_path]
        metrics_ports = [free_port() for _ in range(workers)]
        procs = [subprocess.Popen([*worker, "--metrics-port", str(mp)], env=env) for mp in metrics_ports]
        procs.append(subprocess.Popen([*py, "gateway", "--log-level", "warning"], env=env))
        try:
            url = f"http://127.0.0.1:{port}"
            # an hf worker loads torch first
            wait_ready(f"{url}/api/fleet", lambda r: len(r.json()["workers"]) == workers,
                       headers={"Authorization": f"Bearer {s.api_keys[0]}"} if s.api_keys else None)
            yield Stack(url, model, [pr.pid for pr in procs] + [redis.proc.pid],  # type: ignore[union-attr]
                        procs[-1].pid, redis.url, [f"http://127.0.0.1:{mp}/metrics" for mp in metrics_ports])
        finally:
            stop(procs)


def run_arguments(p: argparse.ArgumentParser) -> None:
    """The load the by-hand mode of a bench stack module runs (``print_runs``): delay, concurrencies, requests."""
    p.add_argument("--delay", type=float, default=0.0, help="seconds between echo tokens")
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("-n", "--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64)


def print_runs(st: Stack, label: dict[str, object], concurrency: list[int], requests: int, max_tokens: int,
               **run_options: bool) -> None:
    """One JSON line per concurrency (the load generator's figures and the servers' CPU): the by-hand mode of the
    bench's stack modules."""
    for c in concurrency:
        before = st.cpu()
        res = asyncio.run(run(st.url, st.model, c, max(requests, c), max_tokens, **run_options))
        print(json.dumps({**label, "concurrency": c, **{k: round(v, 2) for k, v in res.summary().items()},
                          "server_cpu_s": round(st.cpu() - before, 2)}), flush=True)
        for e in res.errors[:3]:
            print("  error:", e)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gateways", type=int, default=1, help="gateway processes on the one port")
    p.add_argument("--engine", default="echo", choices=["echo", "hf"])
    p.add_argument("--model-path", default=None, help="hf: the model directory (redserve tiny-model DIR)")
    run_arguments(p)
    a = p.parse_args()

    with redserve(a.workers, a.delay, a.max_tokens, a.engine, a.model_path, a.gateways) as st:
        for c in a.concurrency:
            before, counted = st.cpu(), st.counters()
            res = asyncio.run(run(st.url, st.model, c, max(a.requests, c), a.max_tokens,
                                  check_echo=a.engine == "echo"))
            cpu = st.cpu() - before
            use = redis_use(counted, st.counters(), res.tokens, res.chunks)
            print(json.dumps({"system": "redserve", "engine": a.engine, "workers": a.workers, "gateways": a.gateways,
                              "delay_ms": a.delay * 1000,
                              "concurrency": c, **{k: round(v, 2) for k, v in res.summary().items()},
                              "server_cpu_s": round(cpu, 2), **{k: round(v, 3) for k, v in use.items()},
                              "gateway_peak_rss_mb": round(st.gateway_peak_rss_mb(), 1)}), flush=True)
            for e in res.errors[:3]:
                print("  error:", e)


if __name__ == "__main__":
    main()
