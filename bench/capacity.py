"""Capacity of one Redis shard, from a measured run, and how keys spread over a cluster's masters.

    python -m bench.capacity                  # all of it, about a minute; writes bench/capacity.json
    python -m bench.capacity --skip-traffic   # only the slot spread (no processes started)

Traffic: one private ``redis-server`` (one shard), one gateway and one echo worker as
processes (``bench.redserve_stack.redserve``), the project's load generator sending
streamed chat requests. Per run it reads from Redis ``INFO commandstats`` (calls per
command, those inside Lua scripts included), ``INFO stats`` (network bytes) and
``INFO cpu`` (the main thread's user + system CPU: Redis runs commands on one thread),
and from the worker its outbox counters (reply messages, and the Redis commands that
carried them). An idle window first measures the background (heartbeats, the janitor,
the gateway's model list) per second; each run subtracts that rate times its wall time.
Dividing by the requests gives commands, bytes and Redis CPU per request, and so the
requests/s one fully busy core carries for that command mix.

Slot spread: the slot of each of 100 models' keys (a model's keys share its hash tag)
and of 50 gateways' reply channels (random 12-hex-digit ids, fixed seed), and the share
of each master for 3, 6 and 12 masters with the slot ranges ``redis-cli --cluster create``
assigns; then the same over many random draws (max share p50/p99).

Why: docs/scaling.md turns these into a capacity model (how many shards, gateways and
workers a fleet needs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from redis import Redis
from redis.crc import key_slot

from bench.loadgen import run
from bench.redserve_stack import Stack, redserve
from broker.keys import Keys
from redserve.redis_server import RedisServer

SLOTS = 16384
IGNORED = {"cmdstat_info", "cmdstat_config"}  # this script's own probes


# --- traffic -----------------------------------------------------------------

@dataclass
class Snapshot:
    calls: dict[str, int]
    net_in: int
    net_out: int
    cpu_main: float  # seconds, main thread, user + system
    cpu_all: float  # seconds, the whole process
    reply_msgs: float
    reply_cmds: float
    t: float


def snapshot(r: Redis, st: Stack) -> Snapshot:
    cmd = cast(dict[str, Any], r.info("commandstats"))
    stats = cast(dict[str, Any], r.info("stats"))
    cpu = cast(dict[str, Any], r.info("cpu"))
    worker = st.counters()
    return Snapshot(
        calls={k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in cmd.items() if k not in IGNORED},
        net_in=int(stats["total_net_input_bytes"]), net_out=int(stats["total_net_output_bytes"]),
        cpu_main=float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"]),
        cpu_all=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        reply_msgs=worker["reply_msgs"], reply_cmds=worker["reply_cmds"], t=time.monotonic())


@dataclass
class Rates:
    """What Redis did over a window, per second of it."""

    calls: dict[str, float]
    net_in: float
    net_out: float
    cpu_main: float

    @staticmethod
    def between(a: Snapshot, b: Snapshot) -> Rates:
        dt = b.t - a.t
        names = set(a.calls) | set(b.calls)
        return Rates({n: (b.calls.get(n, 0) - a.calls.get(n, 0)) / dt for n in names},
                     (b.net_in - a.net_in) / dt, (b.net_out - a.net_out) / dt, (b.cpu_main - a.cpu_main) / dt)


@dataclass
class TrafficRow:
    label: str
    delay_ms: float
    concurrency: int
    requests: int
    tokens_per_request: float
    wall_s: float
    errors: int
    commands_per_request: float
    commands_by_name: dict[str, float]
    reply_msgs_per_request: float
    reply_cmds_per_request: float  # PUBLISH (or EVALSHA emit) commands the worker's outbox sent
    tokens_per_msg: float
    sse_chunks_per_request: float
    bytes_in_per_request: float
    bytes_out_per_request: float
    cpu_us_per_request: float  # Redis main thread, background subtracted
    cpu_us_per_request_process: float  # the whole redis-server process (incl. its I/O of background threads)
    shard_requests_per_s: float  # 1 core / cpu per request
    shard_tokens_per_s: float
    shard_commands_per_s: float
    redis_core_busy: float  # share of one core the run kept Redis busy


def measure(st: Stack, idle: Rates, label: str, delay: float, concurrency: int, requests: int,
            max_tokens: int) -> TrafficRow:
    with Redis.from_url(st.redis_url or "") as r:
        r.config_resetstat()
        a = snapshot(r, st)
        res = asyncio.run(run(st.url, st.model, concurrency, requests, max_tokens, check_echo=True))
        b = snapshot(r, st)
    dt = b.t - a.t
    n = len(res.latency)
    names = set(a.calls) | set(b.calls)
    by_name = {k: (b.calls.get(k, 0) - a.calls.get(k, 0) - idle.calls.get(k, 0.0) * dt) / n for k in names}
    by_name = {k: round(v, 3) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1]) if abs(v) >= 0.005}
    cmds = sum(by_name.values())
    cpu_main = (b.cpu_main - a.cpu_main - idle.cpu_main * dt) / n
    cpu_all = (b.cpu_all - a.cpu_all) / n
    msgs = (b.reply_msgs - a.reply_msgs) / n
    tokens = res.tokens / n
    rps = 1.0 / cpu_main if cpu_main > 0 else float("inf")
    return TrafficRow(
        label=label, delay_ms=delay * 1000, concurrency=concurrency, requests=n, tokens_per_request=tokens,
        wall_s=round(dt, 2), errors=len(res.errors), commands_per_request=round(cmds, 2),
        commands_by_name=by_name, reply_msgs_per_request=round(msgs, 2),
        reply_cmds_per_request=round((b.reply_cmds - a.reply_cmds) / n, 2),
        tokens_per_msg=round(tokens / msgs, 2) if msgs else float("nan"),
        sse_chunks_per_request=round(res.chunks / n, 2),
        bytes_in_per_request=round((b.net_in - a.net_in - idle.net_in * dt) / n),
        bytes_out_per_request=round((b.net_out - a.net_out - idle.net_out * dt) / n),
        cpu_us_per_request=round(cpu_main * 1e6, 1), cpu_us_per_request_process=round(cpu_all * 1e6, 1),
        shard_requests_per_s=round(rps), shard_tokens_per_s=round(rps * tokens),
        shard_commands_per_s=round(rps * cmds), redis_core_busy=round((b.cpu_main - a.cpu_main) / dt, 3))


def idle_rates(st: Stack, seconds: float) -> Rates:
    with Redis.from_url(st.redis_url or "") as r:
        a = snapshot(r, st)
        time.sleep(seconds)
        return Rates.between(a, snapshot(r, st))


@dataclass
class Plan:
    label: str
    delay: float
    runs: list[tuple[int, int]]  # (concurrency, requests)


def traffic(plans: list[Plan], max_tokens: int, idle_s: float) -> tuple[list[TrafficRow], dict[str, Any]]:
    rows: list[TrafficRow] = []
    background: dict[str, Any] = {}
    for plan in plans:
        with redserve(workers=1, delay=plan.delay, max_tokens=max_tokens) as st:
            asyncio.run(run(st.url, st.model, 4, 16, max_tokens))  # warm up: connections, script cache
            idle = idle_rates(st, idle_s)
            background[plan.label] = {"commands_per_s": round(sum(idle.calls.values()), 2),
                                      "by_name": {k: round(v, 2) for k, v in idle.calls.items() if v > 0},
                                      "cpu_us_per_s": round(idle.cpu_main * 1e6, 1)}
            for c, n in plan.runs:
                rows.append(measure(st, idle, plan.label, plan.delay, c, n, max_tokens))
    return rows, background


def saturation(requests: int = 100_000, clients: int = 32) -> dict[str, float]:
    """Redis CPU per command when busy: ``redis-benchmark`` (C clients, one core) against a redis-server pinned
    to core 0, PUBLISH of 600 bytes to one subscribed channel (a bundle) and HSET; and PUBLISH from one client,
    as the stack's runs mostly see it. Empty when redis-benchmark or taskset is missing."""
    if not (shutil.which("redis-benchmark") and shutil.which("taskset")):
        return {}
    out: dict[str, float] = {}
    with RedisServer() as server, Redis.from_url(server.url) as r:
        subprocess.run(["taskset", "-p", "-c", "0", str(server.proc.pid)], check=True,  # type: ignore[union-attr]
                       capture_output=True)
        # a subscriber that keeps up (redis-cli, output discarded), as a gateway does
        sub = subprocess.Popen(["taskset", "-c", "1", "redis-cli", "-p", str(server.port), "subscribe",
                                "redserve:replies:abcdef012345"], stdout=subprocess.DEVNULL)
        while not cast(list[tuple[bytes, int]], r.pubsub_numsub("redserve:replies:abcdef012345"))[0][1]:
            time.sleep(0.05)
        payload = "x" * 600
        cases = {"publish_c1": (1, ["PUBLISH", "redserve:replies:abcdef012345", payload]),
                 f"publish_c{clients}": (clients, ["PUBLISH", "redserve:replies:abcdef012345", payload]),
                 f"hset_c{clients}": (clients, ["HSET", "h", "f", "v"])}
        for name, (c, cmd) in cases.items():
            n = requests // 4 if c == 1 else requests
            before = cast(dict[str, Any], r.info("cpu"))
            t = time.monotonic()
            subprocess.run(["taskset", "-c", "1", "redis-benchmark", "-p", str(server.port), "-c", str(c),
                            "-n", str(n), "-q", *cmd], check=True, capture_output=True)
            wall = time.monotonic() - t
            after = cast(dict[str, Any], r.info("cpu"))
            cpu = sum(float(after[k]) - float(before[k])
                      for k in ("used_cpu_user_main_thread", "used_cpu_sys_main_thread"))
            out[f"{name}_us_per_cmd"] = round(cpu / n * 1e6, 2)
            out[f"{name}_per_s"] = round(n / wall)
            out[f"{name}_core_busy"] = round(cpu / wall, 2)
        sub.terminate()
        sub.wait()
    return out


# --- slot spread -------------------------------------------------------------

def master_ranges(masters: int) -> list[tuple[int, int]]:
    """The slot ranges ``redis-cli --cluster create`` gives ``masters`` masters (3: 0-5460, 5461-10922, ...)."""
    per = SLOTS / masters
    out, first, cursor = [], 0, 0.0
    for i in range(masters):
        last = round(cursor + per - 1)
        if last > SLOTS or i == masters - 1:
            last = SLOTS - 1
        last = max(last, first)
        out.append((first, last))
        first, cursor = last + 1, cursor + per
    return out


def master_of(slot: int, ranges: list[tuple[int, int]]) -> int:
    return next(i for i, (lo, hi) in enumerate(ranges) if lo <= slot <= hi)


def gateway_ids(rng: random.Random, count: int) -> list[str]:
    """Gateway ids as the gateway makes them (``uuid.uuid4().hex[:12]``), from a seeded generator."""
    return [uuid.UUID(int=rng.getrandbits(128), version=4).hex[:12] for _ in range(count)]


def max_share(slots: list[int], ranges: list[tuple[int, int]]) -> float:
    per = Counter(master_of(s, ranges) for s in slots)
    return max(per.values()) / len(slots)


@dataclass
class SpreadRow:
    masters: int
    ranges: list[tuple[int, int]]
    models_per_master: list[int]
    gateways_per_master: list[int]
    models_max_share: float
    gateways_max_share: float
    random_models_max_share_p50: float
    random_models_max_share_p99: float
    random_gateways_max_share_p50: float
    random_gateways_max_share_p99: float


@dataclass
class Spread:
    models: int
    gateways: int
    seed: int
    draws: int
    max_models_in_one_slot: int
    distinct_model_slots: int
    random_max_models_in_one_slot_p99: float
    rows: list[SpreadRow] = field(default_factory=list)


def pct(xs: list[float], p: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[p - 1]


def slot_spread(models: int = 100, gateways: int = 50, seed: int = 1, draws: int = 1000,
                masters: tuple[int, ...] = (3, 6, 12)) -> Spread:
    keys = Keys()
    model_slots = [key_slot(keys.model_workers(f"model-{i}").encode()) for i in range(models)]
    gw_slots = [key_slot(keys.replies(g).encode()) for g in gateway_ids(random.Random(seed), gateways)]
    rng = random.Random(seed + 1)
    # each draw: a fresh set of model names (random, as real names are to the hash) and of gateway ids
    drawn = [([key_slot(keys.model_workers(f"m-{rng.getrandbits(64):x}").encode()) for _ in range(models)],
              [key_slot(keys.replies(g).encode()) for g in gateway_ids(rng, gateways)]) for _ in range(draws)]
    per_slot = Counter(model_slots)
    out = Spread(models, gateways, seed, draws, max(per_slot.values()), len(per_slot),
                 pct([float(max(Counter(m).values())) for m, _ in drawn], 99))
    for m in masters:
        ranges = master_ranges(m)
        mshare = [max_share(ms, ranges) for ms, _ in drawn]
        gshare = [max_share(gs, ranges) for _, gs in drawn]
        out.rows.append(SpreadRow(
            m, ranges, [sum(master_of(s, ranges) == i for s in model_slots) for i in range(m)],
            [sum(master_of(s, ranges) == i for s in gw_slots) for i in range(m)],
            max_share(model_slots, ranges), max_share(gw_slots, ranges),
            pct(mshare, 50), pct(mshare, 99), pct(gshare, 50), pct(gshare, 99)))
    return out


# --- report ------------------------------------------------------------------

def cost_fit(rows: list[TrafficRow]) -> dict[str, float]:
    """Least squares: Redis CPU per request = fixed + per PUBLISH x publishes + per message x messages."""
    import numpy as np

    x = np.array([[1.0, r.reply_cmds_per_request, r.reply_msgs_per_request] for r in rows])
    y = np.array([r.cpu_us_per_request for r in rows])
    (fixed, per_pub, per_msg), *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"fixed_us": round(float(fixed), 1), "per_publish_us": round(float(per_pub), 2),
            "per_message_us": round(float(per_msg), 2)}


def print_traffic(rows: list[TrafficRow], background: dict[str, Any]) -> None:
    print("Redis per request (one shard; background subtracted)")
    head = ("run", "C", "req", "tok/req", "msgs/req", "tok/msg", "pub/req", "cmds/req", "B in/req", "B out/req",
            "CPU us/req", "shard req/s", "shard tok/s", "errors")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(str(x) for x in (
            r.label, r.concurrency, r.requests, r.tokens_per_request, r.reply_msgs_per_request, r.tokens_per_msg,
            r.reply_cmds_per_request, r.commands_per_request, r.bytes_in_per_request, r.bytes_out_per_request,
            r.cpu_us_per_request, f"{r.shard_requests_per_s:,}", f"{r.shard_tokens_per_s:,}", r.errors)))
    for r in rows:
        print(f"  {r.label} C={r.concurrency}: {r.commands_by_name}")
    for label, b in background.items():
        print(f"  background ({label}): {b['commands_per_s']} commands/s, {b['cpu_us_per_s']} CPU us/s: "
              f"{b['by_name']}")


def print_spread(s: Spread) -> None:
    print(f"\nSlot spread: {s.models} models (model-0..), {s.gateways} gateways (seed {s.seed}); "
          f"random: {s.draws} draws")
    print(f"  max models in one slot: {s.max_models_in_one_slot} ({s.distinct_model_slots} distinct slots; "
          f"random p99: {s.random_max_models_in_one_slot_p99:.0f})")
    print("masters | models per master | max share | gateways per master | max share | "
          "random models max share p50/p99 | random gateways p50/p99")
    for r in s.rows:
        print(f"{r.masters} | {r.models_per_master} | {r.models_max_share:.0%} | {r.gateways_per_master} | "
              f"{r.gateways_max_share:.0%} | {r.random_models_max_share_p50:.0%}/{r.random_models_max_share_p99:.0%}"
              f" | {r.random_gateways_max_share_p50:.0%}/{r.random_gateways_max_share_p99:.0%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--idle", type=float, default=6.0, help="seconds of the idle (background) window")
    p.add_argument("--skip-traffic", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).with_name("capacity.json")))
    a = p.parse_args()

    started = time.monotonic()
    rows: list[TrafficRow] = []
    background: dict[str, Any] = {}
    fit: dict[str, float] = {}
    if not a.skip_traffic:
        plans = [Plan("delay 0", 0.0, [(1, a.requests), (16, a.requests)]),
                 # GPU-like pacing: 50 tokens/s per stream; each stream's tokens leave one by one
                 Plan("delay 20ms", 0.02, [(16, 4 * 16), (64, 4 * 64)])]
        rows, background = traffic(plans, a.max_tokens, a.idle)
        print_traffic(rows, background)
        if len(rows) >= 3:
            fit = cost_fit(rows)
            print(f"  fit, Redis CPU per request: {fit}")
    sat: dict[str, float] = {}
    if not a.skip_traffic:
        sat = saturation()
        print(f"\nSaturation (redis-benchmark, redis-server pinned to core 0): {sat}")
    spread = slot_spread()
    print_spread(spread)
    Path(a.out).write_text(json.dumps({
        "argv": ["python", "-m", "bench.capacity"], "max_tokens": a.max_tokens,
        "traffic": [asdict(r) for r in rows], "background": background, "fit": fit, "saturation": sat,
        "spread": asdict(spread),
        "seconds": round(time.monotonic() - started, 1)}, indent=1) + "\n")
    print(f"\nwrote {a.out} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
