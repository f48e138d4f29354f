"""Soak test: the redserve stack under a fixed request rate for a long while; does anything grow or stay behind?

    python -m bench.soak                          # 30 minutes at 50 req/s, 1 echo worker, 20 ms per token
    python -m bench.soak --minutes 2 --rate 50    # a short run (the warm-up scales to a sixth of it)

One gateway process, ``--workers`` echo workers and a private Redis as separate
processes (``bench.redserve_stack.redserve``). The load is open-loop: request
``i`` is sent at ``start + i / rate`` whether or not the earlier ones have
finished (a closed loop would slow down with the server and hide a backlog);
each is a streamed chat request through ``bench.loadgen.one``, which checks the
reply (``[DONE]``, exactly ``--max-tokens`` tokens, the echo text). A short
closed warm-up burst before the clock starts keeps first-request costs
(imports, caches) out of the series.

Every ``--interval`` seconds (30, or a twelfth of a shorter run) a sample: the
resident set (VmRSS) of the gateway and of each worker, Redis's ``used_memory``
and ``used_memory_rss`` (INFO memory), its keys and keys with a TTL (INFO
keyspace), requests done, failed and in flight.

After the load stops and every request has ended, a drain of ``--drain``
seconds, then with the stack still up:

1. every key in the stack's Redis is scanned; each one without a TTL must be
   one of the keys docs/redis.md documents as permanent (``permanent_keys`` below,
   each with its reason); any other is reported;
2. every load set (``Keys.model_workers``: the sorted set of a model's workers,
   score = that worker's queue of the model) is read: every score must be 0.

Verdict: each process's memory grows less than 10% after the warm-up (5 minutes,
or a sixth of a shorter run): the largest sample after it against the first sample
at its end. A process that keeps each request's traces for a while by design is
judged from no earlier than that (``holds_s``: a worker keeps finished jobs'
publishers ``resend_window``, 30 s; Redis keeps each request's hash until its
deadline + 60 s, 120 s), since until then its memory fills with the traffic
however sound it is; a run too short to have a sample after that leaves the
process "not judged" (listed, with how much it grew from the plain warm-up), so
Redis is judged from runs of about 2.5 minutes on. Also: no request failed; no
key without a TTL beyond the documented ones; every load score 0. Written with
the whole series to ``--json`` (bench/soak.json); ``render(data)`` turns it into
markdown lines for bench/RESULTS.md. The rate is printed first and last (req/s
offered and completed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from bench.loadgen import Result, one, run
from bench.redserve_stack import Stack, memory_mb, redserve
from broker.keys import Keys
from broker.settings import Settings

BENCH = Path(__file__).resolve().parent
#: Memory may grow this much (a fraction) after the warm-up.
GROWTH_LIMIT = 0.10
#: The warm-up of a long run; a shorter run's is a sixth of it.
WARMUP_S = 300.0


# --- what may live without a TTL ------------------------------------------------

@dataclass(frozen=True)
class Permanent:
    """A key docs/redis.md documents with no TTL: an exact name, or (``prefix``) a family of names."""

    name: str
    reason: str
    prefix: bool = False

    def matches(self, key: str) -> bool:
        return key.startswith(self.name) if self.prefix else key == self.name


def permanent_keys(keys: Keys, models: list[str]) -> list[Permanent]:
    """Every key meant to live forever (docs/redis.md, "TTL: none"), for a stack serving ``models``.

    Each is bounded by something other than time: the set of workers or models, a cap on entries, or its
    entries leaving when their job ends. Anything else without a TTL grows with the traffic: a leak."""
    out = [
        Permanent(keys.workers(), "registry of worker ids -> models (one field per worker that ever registered; "
                                  "the janitor removes a dead one's once its streams are reclaimed)"),
        Permanent(keys.models(), "every model ever announced, score = last announced (one member per model)"),
        Permanent(keys.dead_letters(), "dead-letter stream, capped at ~10,000 entries"),
        Permanent(keys.votes(), "side-by-side votes stream, trimmed to votes_max_entries"),
        Permanent(keys.feedback(), "feedback stream, trimmed to votes_max_entries"),
        Permanent(keys.conversations(), "conversation log (opt-in), trimmed to conversations_max_entries"),
        Permanent(keys.arena_votes(), "arena votes stream, trimmed to votes_max_entries"),
        Permanent(keys.leaderboard(), "the leaderboard's running state (one field per model and pair)"),
        Permanent(keys.batch_queue(), "arq's queue of batch jobs: a job leaves it when it ends"),
        Permanent("arq:abort", "arq's set of jobs to abort (arq fixes the name): a job leaves it when it ends"),
    ]
    for model in models:
        out += [
            Permanent(keys.model_workers(model), f"load set of model {model!r}: one member per worker, "
                                                 "pruned by dispatch once a seat expired"),
            Permanent(keys.jobs_prefix(model), f"job streams of model {model!r}, one per worker (the consumer "
                                               "group lives with the stream); a job's entry is deleted when "
                                               "it ends", prefix=True),
        ]
    return out


# --- the load ---------------------------------------------------------------------

@dataclass
class Load:
    """An open-loop driver's running state."""

    rate: float
    res: Result = field(default_factory=Result)
    started: int = 0
    late_max_s: float = 0.0  # how far behind its schedule the driver ever sent a request

    @property
    def done(self) -> int:
        return len(self.res.latency)

    @property
    def errors(self) -> int:
        return len(self.res.errors)

    @property
    def in_flight(self) -> int:
        return self.started - self.done - self.errors


async def drive(http: aiohttp.ClientSession, model: str, max_tokens: int, seconds: float, load: Load) -> None:
    """Send request ``i`` at ``start + i / rate`` for ``seconds``, then wait for every one to end."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    start = loop.time()
    n = int(seconds * load.rate)
    for i in range(n):
        due = start + i / load.rate
        if (wait := due - loop.time()) > 0:
            await asyncio.sleep(wait)
        else:
            load.late_max_s = max(load.late_max_s, -wait)
        load.started += 1
        task = asyncio.create_task(one(http, model, max_tokens, 1_000_000 + i, load.res, check_echo=True))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)


# --- samples ----------------------------------------------------------------------

def mb(n: float) -> float:
    return round(n / 2**20, 2)


def worker_pids(st: Stack) -> list[int]:
    """The workers' pids (``redserve`` starts them first, then the gateway, then Redis last)."""
    return [p for p in st.pids[:-1] if p != st.main_pid]


async def sample(r: AsyncRedis, st: Stack, load: Load, t: float) -> dict[str, Any]:
    mem = await r.info("memory")
    space = (await r.info("keyspace")).get("db0", {})
    keys, expires = int(space.get("keys", 0)), int(space.get("expires", 0))
    return {"t": round(t, 1),
            "gateway_rss_mb": round(memory_mb(st.main_pid, "VmRSS"), 2),
            "worker_rss_mb": [round(memory_mb(p, "VmRSS"), 2) for p in worker_pids(st)],
            "redis_used_memory_mb": mb(mem["used_memory"]), "redis_rss_mb": mb(mem["used_memory_rss"]),
            "redis_keys": keys, "redis_keys_without_ttl": keys - expires,
            "started": load.started, "done": load.done, "errors": load.errors, "in_flight": load.in_flight}


async def sampler(r: AsyncRedis, st: Stack, load: Load, start: float, seconds: float, interval: float,
                  out: list[dict[str, Any]], echo: Callable[[dict[str, Any]], None]) -> None:
    """One sample at each ``start + k * interval`` up to ``start + seconds`` (the last one at the very end)."""
    loop = asyncio.get_running_loop()
    k = 0
    while True:
        due = min(start + k * interval, start + seconds)
        await asyncio.sleep(max(0.0, due - loop.time()))
        s = await sample(r, st, load, loop.time() - start)
        out.append(s)
        echo(s)
        if due >= start + seconds:
            return
        k += 1


# --- the end: keys and load scores -------------------------------------------------

def load_scores(r: Redis, keys: Keys, models: list[str]) -> list[dict[str, Any]]:
    """Every member and score of the load sets of ``models``."""
    return [{"key": keys.model_workers(m), "worker": member.decode(), "score": score} for m in models
            for member, score in cast(list[tuple[bytes, float]],
                                      r.zrange(keys.model_workers(m), 0, -1, withscores=True))]


def audit(r: Redis, keys: Keys, models: list[str]) -> dict[str, Any]:
    """Every key without a TTL (allowed: which documented key it is; else a leak) and every load set's scores."""
    names = sorted(k.decode() for k in r.scan_iter(count=1000))
    known = sorted({*models, *(m.decode() for m in cast(list[bytes], r.zrange(keys.models(), 0, -1)))})
    allowed = permanent_keys(keys, known)
    ttls: list[int] = []
    for i in range(0, len(names), 1000):
        pipe = r.pipeline(transaction=False)
        for name in names[i:i + 1000]:
            pipe.ttl(name)
        ttls += pipe.execute()
    without_ttl, unexpected = [], []
    for name, ttl in zip(names, ttls):
        if ttl != -1:  # -2: expired meanwhile
            continue
        why = next((p.reason for p in allowed if p.matches(name)), None)
        row = {"key": name, "type": cast(bytes, r.type(name)).decode(), "allowed": why}
        without_ttl.append(row)
        if why is None:
            unexpected.append(row)
    # every load set: of the known models, and any other key shaped like one (a model no longer announced)
    load_sets = {keys.model_workers(m) for m in known}
    load_sets |= {n for n in names if n.startswith(f"{keys.prefix}:{{") and n.endswith(":workers")
                  and ":model:" in n and r.type(n) == b"zset"}
    scores, nonzero = [], []
    for name in sorted(load_sets):
        for member, score in cast(list[tuple[bytes, float]], r.zrange(name, 0, -1, withscores=True)):
            row = {"key": name, "worker": member.decode(), "score": score}
            scores.append(row)
            if score != 0:
                nonzero.append(row)
    # what is left in the job streams (a non-zero score's likely cause: an entry never deleted)
    streams = [{"key": n, "length": r.xlen(n)} for n in names if any(n.startswith(keys.jobs_prefix(m)) for m in known)]
    return {"keys_scanned": len(names), "without_ttl": without_ttl, "unexpected_without_ttl": unexpected,
            "load_scores": scores, "nonzero_scores": nonzero, "job_streams": streams}


# --- the verdict ----------------------------------------------------------------------

def warmup_s(seconds: float) -> float:
    """5 minutes, or a sixth of a run shorter than 30 minutes."""
    return min(WARMUP_S, seconds / 6)


def holds_s(settings: Settings) -> dict[str, float]:
    """How long each kind of process keeps what a request left behind, by design: until then its memory grows
    with the traffic however sound it is, so it is judged from no earlier than that.

    gateway: nothing past the request. worker: a finished job's publisher, for ``resend_window``.
    Redis: the request's hash, until its deadline (``reply_timeout`` after dispatch) + 60 s
    (broker/dispatch.py), and a replay log, ``replay_window`` after its last message."""
    return {"gateway": 0.0, "worker": settings.resend_window,
            "redis": max(settings.reply_timeout + 60, settings.reply_timeout + settings.replay_window)}


def growth(points: list[tuple[float, float]], start: float) -> dict[str, Any]:
    """The first sample at ``start`` (the end of the warm-up) against the largest one after it."""
    at = next((i for i, (t, _) in enumerate(points) if t >= start - 0.5), None)
    if at is None or at == len(points) - 1:
        return {"judged_from_s": round(start, 1), "first_mb": points[0][1] if points else None,
                "at_warmup_mb": None, "max_after_mb": None, "last_mb": points[-1][1] if points else None,
                "growth": None, "ok": None, "note": f"not judged: no sample after {start:g} s"}
    base = points[at][1]
    after = max(v for _, v in points[at + 1:])
    g = after / base - 1 if base > 0 else float("inf")
    return {"judged_from_s": round(points[at][0], 1), "first_mb": points[0][1], "at_warmup_mb": base,
            "max_after_mb": after, "last_mb": points[-1][1], "growth": round(g, 4), "ok": g < GROWTH_LIMIT}


def series(samples: list[dict[str, Any]]) -> dict[str, tuple[str, list[tuple[float, float]]]]:
    """Each process's memory over time, with its kind: the gateway, each worker, Redis (its RSS, and its data:
    used_memory)."""
    out = {"gateway": ("gateway", [(s["t"], s["gateway_rss_mb"]) for s in samples])}
    for i in range(len(samples[0]["worker_rss_mb"]) if samples else 0):
        out[f"worker {i + 1}"] = ("worker", [(s["t"], s["worker_rss_mb"][i]) for s in samples])
    out["redis"] = ("redis", [(s["t"], s["redis_rss_mb"]) for s in samples])
    out["redis used_memory"] = ("redis", [(s["t"], s["redis_used_memory_mb"]) for s in samples])
    return out


def verdict(samples: list[dict[str, Any]], seconds: float, load: Load, found: dict[str, Any],
            holds: dict[str, float]) -> dict[str, Any]:
    warm = warmup_s(seconds)
    memory = {}
    for name, (kind, points) in series(samples).items():
        m = memory[name] = growth(points, max(warm, holds[kind]))
        if holds[kind] > warm:
            plain = growth(points, warm)["growth"]
            m["note"] = (f"{'not judged: no sample after' if m['ok'] is None else 'judged from'} {holds[kind]:g} s, "
                         f"not {warm:g} s: it holds each request's traces that long by design"
                         + ("" if plain is None else f" (from {warm:g} s it grew {plain:+.1%})"))
    judged = [m for m in memory.values() if m["ok"] is not None]
    out = {
        "warmup_s": round(warm, 1),
        "holds_s": holds,
        "growth_limit": GROWTH_LIMIT,
        "memory": memory,
        "memory_ok": bool(judged) and all(m["ok"] for m in judged),
        "memory_not_judged": [name for name, m in memory.items() if m["ok"] is None],
        "requests": load.started, "done": load.done, "errors": load.errors,
        "errors_ok": load.errors == 0 and load.done == load.started,
        "keys_without_ttl": len(found["without_ttl"]),
        "unexpected_keys_without_ttl": [k["key"] for k in found["unexpected_without_ttl"]],
        "keys_ok": not found["unexpected_without_ttl"],
        "load_scores": len(found["load_scores"]),
        "nonzero_scores": found["nonzero_scores"],
        "scores_ok": bool(found["load_scores"]) and not found["nonzero_scores"],
    }
    out["ok"] = all(out[k] for k in ("memory_ok", "errors_ok", "keys_ok", "scores_ok"))
    return out


# --- the run ------------------------------------------------------------------------

def interval_for(seconds: float) -> float:
    return min(30.0, max(1.0, seconds / 12))


def soak(minutes: float = 30.0, rate: float = 50.0, delay: float = 0.02, max_tokens: int = 64, workers: int = 1,
         interval: float | None = None, drain: float = 5.0, extra: dict[str, Any] | None = None,
         quiet: bool = False) -> dict[str, Any]:
    """Run the soak and return everything measured (what ``--json`` writes)."""
    seconds = minutes * 60
    interval = interval or interval_for(seconds)

    def echo(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    def show(s: dict[str, Any]) -> None:
        ws = " ".join(f"{w:.1f}" for w in s["worker_rss_mb"])
        echo(f"  t={s['t']:7.1f}s gateway {s['gateway_rss_mb']:6.1f} MB  workers {ws} MB  "
             f"redis used {s['redis_used_memory_mb']:.1f} rss {s['redis_rss_mb']:.1f} MB "
             f"keys {s['redis_keys']} (no TTL {s['redis_keys_without_ttl']})  "
             f"done {s['done']} errors {s['errors']} in flight {s['in_flight']}")

    settings = Settings(**(extra or {}))
    keys = Keys(settings.key_prefix)
    ideal_tok_s = rate * max_tokens
    echo(f"soak: {rate:g} req/s offered (open loop, {ideal_tok_s:,.0f} tok/s at {max_tokens} tokens each) for "
         f"{minutes:g} min; {workers} echo worker(s), {delay * 1000:g} ms per token; samples every {interval:g} s, "
         f"warm-up {warmup_s(seconds):g} s")
    load = Load(rate)
    samples: list[dict[str, Any]] = []
    t0 = time.time()
    with redserve(workers, delay, max_tokens, extra=extra) as st:
        assert st.redis_url is not None
        warm = asyncio.run(run(st.url, st.model, 4, 8, max_tokens, check_echo=True))  # first-request costs
        if warm.errors:
            raise RuntimeError(f"the warm-up failed: {warm.errors[0]}")

        async def go() -> float:
            assert st.redis_url is not None
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
            async with (aiohttp.ClientSession(st.url, connector=connector, timeout=timeout) as http,
                        AsyncRedis.from_url(st.redis_url) as r):
                loop = asyncio.get_running_loop()
                start = loop.time()
                watch = asyncio.create_task(sampler(r, st, load, start, seconds, interval, samples, show))
                await drive(http, st.model, max_tokens, seconds, load)
                ended = loop.time() - start
                await watch
                return ended

        ended = asyncio.run(go())
        with Redis.from_url(st.redis_url) as r:
            at_end = load_scores(r, keys, [st.model])  # before any heartbeat could correct a drift
            echo(f"load stopped; every request ended {ended - seconds:.1f} s after the last was sent; load "
                 f"scores then: {[s['score'] for s in at_end]}; draining {drain:g} s")
            time.sleep(drain)
            found = audit(r, keys, [st.model])
            found["scores_at_load_end"] = at_end
    wall = time.time() - t0
    summary = {k: round(v, 2) for k, v in load.res.summary().items() if k not in ("tokens_per_s", "chunks_per_s",
                                                                                  "wall_s")}
    data = {
        "argv": ["python", "-m", "bench.soak", *sys.argv[1:]] if __name__ == "__main__" else [],
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "minutes": minutes, "rate": rate, "delay_ms": delay * 1000, "max_tokens": max_tokens, "workers": workers,
        "interval_s": interval, "drain_s": drain, "extra": extra or {},
        "achieved_rate": round(load.done / seconds, 2) if seconds else 0.0,
        "tokens_per_s": round(load.res.tokens / seconds, 1) if seconds else 0.0,
        "late_max_s": round(load.late_max_s, 3),
        "latency": summary,
        "first_errors": load.res.errors[:5],
        "wall_s": round(wall, 1),
        "samples": samples,
        "audit": found,
        "verdict": verdict(samples, seconds, load, found, holds_s(settings)),
    }
    return data


# --- markdown -------------------------------------------------------------------------

def _yes(ok: bool | None) -> str:
    return "–" if ok is None else "yes" if ok else "**no**"


def _mb(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f}"


def render(data: dict[str, Any]) -> list[str]:
    """Markdown for bench/RESULTS.md: the run, its verdict, each process's memory, and the series."""
    v = data["verdict"]
    lat = data["latency"]
    out = [f"Soak (`python -m bench.soak`), {data.get('when', '')}, {data.get('machine', '')}: one gateway "
           f"process, {data['workers']} echo worker(s) and Redis; open loop at **{data['rate']:g} req/s** for "
           f"{data['minutes']:g} min ({data['max_tokens']} tokens per streamed reply, {data['delay_ms']:g} ms "
           f"per token; {data['achieved_rate']:g} req/s and {data['tokens_per_s']:,.0f} tok/s delivered; "
           f"latency p50 {lat.get('latency_p50_ms', float('nan')):,.0f} ms, p99 "
           f"{lat.get('latency_p99_ms', float('nan')):,.0f} ms). A process's memory is judged from the end of "
           f"the warm-up ({v['warmup_s']:g} s), or from when it stops holding a request's traces by design if "
           f"later (worker {v['holds_s']['worker']:g} s, Redis {v['holds_s']['redis']:g} s): the largest sample "
           f"after it against the sample then.", "",
           "| check | measured | met? |", "|---|---|---|"]
    judged = {name: m["growth"] for name, m in v["memory"].items() if m["growth"] is not None}
    worst = max(judged, key=lambda n: judged[n]) if judged else None
    missing = v["memory_not_judged"]
    out.append(f"| memory of every process grows less than {v['growth_limit']:.0%} after the warm-up | "
               + (f"largest: {worst} {judged[worst]:+.1%}" if worst else "none judged")
               + (f"; not judged (run too short): {', '.join(missing)}" if missing else "")
               + f" | {_yes(v['memory_ok'])} |")
    out.append(f"| no request fails | {v['errors']:,} errors, {v['done']:,} of {v['requests']:,} complete | "
               f"{_yes(v['errors_ok'])} |")
    unexpected = v["unexpected_keys_without_ttl"]
    shown = ", ".join(f"`{k}`" for k in unexpected[:3]) + (" …" if len(unexpected) > 3 else "")
    out.append(f"| no key without a TTL but the documented ones | {v['keys_without_ttl']} without a TTL, "
               f"{len(unexpected)} unexpected{': ' + shown if unexpected else ''} | {_yes(v['keys_ok'])} |")
    nz = ", ".join(f"{s['worker']} {s['score']:g}" for s in v["nonzero_scores"][:3])
    out.append(f"| every worker's load score back to 0 | {v['load_scores']} scores, "
               f"{len(v['nonzero_scores'])} non-zero{': ' + nz if nz else ''} | {_yes(v['scores_ok'])} |")
    out += ["", "| process | MB at start | judged from s | MB then | max MB after | MB at end | growth | met? |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, m in v["memory"].items():
        g = "–" if m["growth"] is None else f"{m['growth']:+.1%}"
        out.append(f"| {name} | {_mb(m.get('first_mb'))} | {m['judged_from_s']:g} | {_mb(m.get('at_warmup_mb'))} | "
                   f"{_mb(m.get('max_after_mb'))} | {_mb(m.get('last_mb'))} | {g} | {_yes(m['ok'])} |")
    notes = [f"- {name}: {m['note']}." for name, m in v["memory"].items() if m.get("note")]
    if notes:
        out += ["", *notes]
    samples = data["samples"]
    step = max(1, -(-len(samples) // 13))  # at most ~13 rows
    rows = samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else [])
    out += ["", "| t s | gateway MB | worker MB | Redis used MB | Redis RSS MB | Redis keys (no TTL) | done | errors "
                "| in flight |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in rows:
        ws = " / ".join(f"{w:.1f}" for w in s["worker_rss_mb"])
        out.append(f"| {s['t']:,.0f} | {s['gateway_rss_mb']:.1f} | {ws}"
                   f" | {s['redis_used_memory_mb']:.1f} | {s['redis_rss_mb']:.1f} | {s['redis_keys']:,} "
                   f"({s['redis_keys_without_ttl']}) | {s['done']:,} | {s['errors']:,} | {s['in_flight']:,} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=50.0, help="requests per second, open loop")
    p.add_argument("--delay", type=float, default=0.02, help="seconds between echo tokens")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--interval", type=float, default=None, help="seconds between samples (30, or run/12)")
    p.add_argument("--drain", type=float, default=5.0, help="seconds after the last reply before the audit")
    p.add_argument("--json", default=str(BENCH / "soak.json"))
    a = p.parse_args()
    data = soak(a.minutes, a.rate, a.delay, a.max_tokens, a.workers, a.interval, a.drain)
    Path(a.json).write_text(json.dumps(data, indent=1) + "\n")
    v = data["verdict"]
    print("\n".join(render(data)))
    print(f"\nrate: {data['rate']:g} req/s offered, {data['achieved_rate']:g} req/s completed "
          f"({data['tokens_per_s']:,.0f} tok/s); verdict: {'PASS' if v['ok'] else 'FAIL'}; wrote {a.json}")
    for e in data["first_errors"]:
        print("  error:", e)
    for k in data["audit"]["unexpected_without_ttl"][:20]:
        print(f"  key without TTL: {k['key']} ({k['type']})")
    for s in v["nonzero_scores"][:20]:
        print(f"  non-zero load score: {s['key']} {s['worker']} = {s['score']:g}")
    sys.exit(0 if v["ok"] else 1)


if __name__ == "__main__":
    main()
