"""Cancellation under load: how many tokens a worker generates after its client went away.

    python -m bench.cancel                      # N = 20 and 500 streams, echo delay 20 ms, 64 tokens
    python -m bench.cancel -n 500 --trace       # also time each stage of the cancel path (instrumented run)
    python -m bench.cancel -n 500 --profile 3   # and py-spy the gateway and the worker for 3 s from the drop
    python -m bench.cancel --render             # print the markdown table of --json

For each N: a fresh stack (``bench.redserve_stack.redserve``: private Redis, echo workers, one gateway),
N streamed chat requests opened at once, each read until its first content token, then every connection
dropped in one loop (``SO_LINGER`` 0 and ``abort()``: a reset, as a client that goes away). The client's
own clock marks each drop.

What the workers did is read from Redis, not from the client: a *tap* process PSUBSCRIBEs to every
gateway's reply channel and every worker's control channel and timestamps each message (CLOCK_MONOTONIC,
shared by every process of the machine). Per request that gives the tokens the worker published after
the client left, when the gateway's ``Cancel`` reached the worker's control channel, and when the worker's
last message (its ``cancelled`` error) went out. The tap's clock is checked against the client's: the
tap sees a request's first token before the client does (``tap_lead_ms``), so it is no late witness.
The workers' own counter of generated tokens (``redserve_worker_generated_tokens``, before and after)
minus what the tap saw published before the drop gives the same figure in aggregate, tokens generated but
never published (cut off by the cancel) included.

``--repeat R`` runs each N R times, each on a fresh stack. ``--trace`` adds one instrumented run per N: a
``sitecustomize`` on the gateway's and the workers' PYTHONPATH wraps uvicorn's ``connection_lost``,
sse-starlette's disconnect listener, ``gateway.generation._release``, the PUBLISH of the Cancel, the
worker's control handler and job end, and notes each with the time (one write(2) each); it also stamps
every token the worker's engine yields (per request, by the worker's own clock) and runs an event-loop lag
probe in both processes (a 5 ms sleep's overshoot, with the KB of replies the gateway's router handed on
meanwhile). The instrumented run is slower; its figures are kept apart.

The load generator's CPU time (``time.process_time``) is reported for the ramp, the reset loop and the
window until every job ended, next to each serving process's, so a slow client is not blamed on the server.
A stream whose job ended before the reset (the ramp took longer than the reply) is not counted (``live``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import pickle
import platform
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.redserve_stack import Stack, redserve, tree_cpu_seconds
from broker.keys import Keys
from broker.protocol import Cancel, Delta, Done, Failure, Reply, control

ROOT = Path(__file__).resolve().parent.parent
TARGET_P99 = 3.0  # tokens generated after the disconnect, p99, at N = 500
RATE_WINDOW = 0.25  # seconds before the drop over which each stream's token pace is measured

#: (tap time, channel, payload) of one message the tap saw.
TapRecord = tuple[float, bytes, bytes]


# --- the tap: a process of its own that timestamps every reply and control message --------------------------


def tap_main(redis_url: str, out: str) -> None:
    """Record every message on the reply and control channels until SIGTERM, then pickle them to ``out``."""
    from redis import Redis as SyncRedis

    keys = Keys()
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    seen: list[TapRecord] = []
    with SyncRedis.from_url(redis_url) as r:
        ps = r.pubsub()
        ps.psubscribe(keys.replies("*"), keys.worker_control("*"))
        confirmed = 0
        while confirmed < 2:
            msg = ps.get_message(timeout=1.0)
            confirmed += msg is not None and msg["type"] == "psubscribe"
        print("ready", flush=True)
        while not stop:
            msg = ps.get_message(timeout=0.05)
            if msg is not None and msg["type"] == "pmessage":
                seen.append((time.monotonic(), msg["channel"], msg["data"]))
    with open(out, "wb") as f:
        pickle.dump(seen, f)


class Tap:
    """The tap process, started and stopped from the benchmark."""

    def __init__(self, redis_url: str) -> None:
        fd, self.out = tempfile.mkstemp(prefix="cancel-tap-", suffix=".pickle")
        os.close(fd)
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.cancel", "--tap", redis_url, self.out],
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError("the tap never subscribed")

    def cpu(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def stop(self) -> list[TapRecord]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        with open(self.out, "rb") as f:
            seen: list[TapRecord] = pickle.load(f)
        os.unlink(self.out)
        return seen


# --- the client: raw HTTP/1.1, so nothing pools, retries or reads on behind our back ------------------------


@dataclass
class Opened:
    """One stream as the client held it."""

    i: int
    rid: str = ""
    t_open: float = 0.0
    t_first: float = 0.0  # monotonic: the first content token read
    t_drop: float = 0.0  # monotonic: just before its connection was reset
    error: str = ""
    writer: asyncio.StreamWriter | None = field(default=None, repr=False)


def _request(host: str, i: int, max_tokens: int) -> bytes:
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": f"cancel benchmark {i}"}],
                       "max_tokens": max_tokens, "stream": True}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _headers(reader: asyncio.StreamReader) -> str:
    """Read the response head; '' for a 200, else the status line."""
    status = (await reader.readline()).decode().strip()
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    return "" if " 200 " in f"{status} " else status or "connection closed"


async def open_stream(host: str, port: int, i: int, max_tokens: int, *, until_done: bool = False) -> Opened:
    """Send one streamed chat request and read it until its first content token (``until_done``: to [DONE])."""
    s = Opened(i, t_open=time.monotonic())
    reader, writer = await asyncio.open_connection(host, port)
    s.writer = writer
    writer.write(_request(host, i, max_tokens))
    s.error = await _headers(reader)
    if s.error:
        return s
    while line := await reader.readline():
        if until_done and line.startswith(b"data: [DONE]"):
            return s
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        s.rid = s.rid or chunk["id"].split("-", 1)[1]
        if not until_done and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            s.t_first = time.monotonic()
            return s
    s.error = "the stream ended before its first token"
    return s


def drop(streams: list[Opened]) -> None:
    """Reset every connection, one after the other with nothing in between (the sockets close on the next
    loop turn; each stream's ``t_drop`` is taken before its reset, so a slow loop counts against the server)."""
    linger = struct.pack("ii", 1, 0)
    for s in streams:
        s.t_drop = time.monotonic()
        if s.writer is None:
            continue
        sock = s.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.writer.transport.abort()


# --- the workers' counters ---------------------------------------------------------------------------------


def worker_counters(st: Stack) -> dict[str, float]:
    """Summed over the workers: tokens generated, jobs finished, jobs running."""
    return st.worker_sums({"redserve_worker_generated_tokens_total": "generated",
                           "redserve_worker_jobs_total": "jobs", "redserve_worker_running_jobs": "running"})


_RUNNING = re.compile(rb"^redserve_worker_running_jobs\{[^}]*\} (\S+)$", re.MULTILINE)


async def until_idle(st: Stack, timeout: float) -> float:
    """Wait until no worker runs a job; returns when (monotonic). Polled every 100 ms on one kept-alive
    connection per worker, reading one line of each /metrics: the client's CPU in this window is reported,
    and should be the resets' rather than the polling's. (When the jobs ended is taken from the tap.)"""
    end = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() < end:
            pages = await asyncio.gather(*(http.get(url) for url in st.worker_metrics))
            if not any(float(m) for page in pages for m in _RUNNING.findall(page.content)):
                return time.monotonic()
            await asyncio.sleep(0.1)
    raise TimeoutError(f"jobs still running {timeout:g} s after the drop")


# --- from what the tap saw to per-request figures ----------------------------------------------------------


@dataclass
class Seen:
    """What the tap saw of one request."""

    messages: list[tuple[float, int]] = field(default_factory=list)  # (tap time, tokens)
    t_end: float | None = None
    outcome: str = ""  # cancelled, done, error
    t_cancel: float | None = None


def _outcome(reply: Reply) -> str:
    for ev in reply.events:
        if isinstance(ev, Done):
            return "done"
        if isinstance(ev, Failure):
            return "cancelled" if ev.code == "cancelled" else "error"
    return ""


def sort_tap(records: list[TapRecord]) -> dict[str, Seen]:
    """The tap's messages by request id."""
    by_rid: dict[str, Seen] = {}
    for t, channel, data in records:
        if channel.endswith(b":control"):
            msg = control(data)
            if isinstance(msg, Cancel):
                seen = by_rid.setdefault(msg.rid, Seen())
                seen.t_cancel = t if seen.t_cancel is None else seen.t_cancel
            continue
        for reply in Reply.decode_all(data):
            seen = by_rid.setdefault(reply.rid, Seen())
            tokens = sum(ev.tokens for ev in reply.events if isinstance(ev, Delta))
            seen.messages.append((t, tokens))
            if (outcome := _outcome(reply)) and seen.t_end is None:
                seen.t_end, seen.outcome = t, outcome
    return by_rid


def per_request(streams: list[Opened], by_rid: dict[str, Seen]) -> list[dict[str, Any]]:
    """One row per stream that reached its first token: tokens published after its drop, and stage times."""
    rows = []
    for s in streams:
        if s.error or not s.rid:
            continue
        seen = by_rid.get(s.rid, Seen())
        first = next((t for t, k in seen.messages if k), None)
        rows.append({
            "rid": s.rid,
            "tokens": sum(k for _, k in seen.messages),
            "after": sum(k for t, k in seen.messages if t > s.t_drop),
            "before": sum(k for t, k in seen.messages if t <= s.t_drop),
            "token_ms": _pace(seen.messages, s.t_drop),
            "outcome": seen.outcome or "none",
            "ended_before_drop": seen.t_end is not None and seen.t_end <= s.t_drop,
            "cancel_ms": _ms(seen.t_cancel, s.t_drop),
            "stop_ms": _ms(seen.t_end, s.t_drop),
            # Cancel on Redis -> the worker's 'cancelled' message (None when the job had ended some other way)
            "worker_ms": _ms(seen.t_end, seen.t_cancel) if seen.t_cancel and seen.outcome == "cancelled" else None,
            "tap_lead_ms": _ms(s.t_first, first) if first is not None else None,
            "ttft_ms": _ms(s.t_first, s.t_open),
        })
    return rows


def _pace(messages: list[tuple[float, int]], t_drop: float) -> float | None:
    """The worker's pace on one stream just before the drop, ms per token: over its messages of the last
    RATE_WINDOW seconds, the time from the first to the last over the tokens that came after the first."""
    recent = [(t, k) for t, k in messages if t_drop - RATE_WINDOW < t <= t_drop and k]
    tokens = sum(k for _, k in recent[1:])
    return (recent[-1][0] - recent[0][0]) * 1000 / tokens if tokens else None


def _ms(t: float | None, ref: float) -> float | None:
    return None if t is None else (t - ref) * 1000


def dist(xs: list[float]) -> dict[str, float | int | None]:
    """mean, p50, p99, max (percentiles interpolated, as ``statistics.quantiles(method='inclusive')``)."""
    if not xs:
        return {"n": 0, "mean": None, "p50": None, "p99": None, "max": None}
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else [xs[0]] * 99
    return {"n": len(xs), "mean": round(statistics.fmean(xs), 3), "p50": round(q[49], 3), "p99": round(q[98], 3),
            "max": round(max(xs), 3)}


def summarise(rows: list[dict[str, Any]], generated: float, tap_tokens_before_all: int) -> dict[str, Any]:
    """The figures of one run. ``generated``: the workers' generated-token counter over the run;
    ``tap_tokens_before_all``: tokens the tap saw published before each request's drop, over every request."""
    live = [r for r in rows if not r["ended_before_drop"]]

    def values(key: str) -> list[float]:
        return [r[key] for r in live if r[key] is not None]

    return {
        "streams": len(rows),
        "ended_before_drop": len(rows) - len(live),
        "outcomes": {o: sum(1 for r in live if r["outcome"] == o) for o in sorted({r["outcome"] for r in live})},
        "after": dist([float(r["after"]) for r in live]),
        "after_generated_mean": round((generated - tap_tokens_before_all) / len(live), 3) if live else None,
        "generated_total": generated,
        "published_total": sum(r["tokens"] for r in rows),
        "cancel_ms": dist(values("cancel_ms")),
        "worker_ms": dist(values("worker_ms")),
        "stop_ms": dist(values("stop_ms")),
        "tap_lead_ms": dist(values("tap_lead_ms")),
        "ttft_ms": dist([r["ttft_ms"] for r in rows]),
        # ms per token the worker actually managed per stream just before the drop (the nominal is the echo delay)
        "token_ms": dist(values("token_ms")),
    }


# --- the stage trace (--trace): installed into the gateway and worker processes by a sitecustomize --------

_SITECUSTOMIZE = """\
import os
import sys
if os.environ.get("BENCH_CANCEL_TRACE") and sys.argv[1:2] in (["gateway"], ["worker"]):
    try:
        from bench.cancel import install_trace
        install_trace(os.environ["BENCH_CANCEL_TRACE"])
    except Exception as exc:
        print("bench.cancel: no trace:", repr(exc), file=sys.stderr)
"""


@contextlib.contextmanager
def traced_env(directory: str) -> Iterator[None]:
    """While inside, processes started inherit a PYTHONPATH whose sitecustomize installs ``install_trace``."""
    site = Path(directory) / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "BENCH_CANCEL_TRACE")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(ROOT), saved["PYTHONPATH"]) if p)
    os.environ["BENCH_CANCEL_TRACE"] = directory
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def install_trace(directory: str) -> None:
    """Wrap the cancel path of this process (a ``redserve gateway`` or ``redserve worker``): each stage
    appends ``stage rid monotonic`` to a file of its own in ``directory``, one write(2) each."""
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role not in ("gateway", "worker"):
        return
    fd = os.open(os.path.join(directory, f"{role}-{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def note(stage: str, rid: str = "-") -> None:
        os.write(fd, f"{stage} {rid} {time.monotonic():.6f}\n".encode())

    (_trace_gateway if role == "gateway" else _trace_worker)(note)


def _trace_gateway(note: Any) -> None:  # noqa: C901 - one small wrapper per stage
    import sse_starlette.sse as sse
    from uvicorn.protocols.http import httptools_impl

    import broker.client as client
    import broker.replies as replies
    import gateway.generation as generation

    lost = httptools_impl.HttpToolsProtocol.connection_lost

    def connection_lost(self: Any, exc: Exception | None) -> None:
        note("lost")
        lost(self, exc)

    httptools_impl.HttpToolsProtocol.connection_lost = connection_lost  # type: ignore[method-assign]

    listen = sse.EventSourceResponse._listen_for_disconnect

    async def listen_for_disconnect(self: Any, receive: Any) -> None:
        await listen(self, receive)
        if self._client_disconnected:
            note("listener")

    sse.EventSourceResponse._listen_for_disconnect = listen_for_disconnect  # type: ignore[method-assign]

    release = generation._release

    async def traced_release(broker: Any, stream: Any) -> None:
        note("release", stream.rid)
        await release(broker, stream)
        note("released", stream.rid)

    generation._release = traced_release  # type: ignore[assignment]

    publish = client.publish  # type: ignore[attr-defined]  # the name BrokerClient.cancel calls

    async def traced_publish(redis: Any, channel: str, data: Any, **options: Any) -> int:
        rid = getattr(control(data), "rid", "-") if channel.endswith(":control") else "-"
        note("publish", rid)
        n = await publish(redis, channel, data, **options)
        note("published", rid)
        return n

    client.publish = traced_publish  # type: ignore[attr-defined]

    route = replies.ReplyRouter._route

    def traced_route(self: Any, data: bytes) -> None:
        _routed[0] += len(data)
        route(self, data)

    replies.ReplyRouter._route = traced_route  # type: ignore[method-assign]

    start = client.BrokerClient.start

    async def traced_start(self: Any) -> Any:
        _lag_probe(note)
        return await start(self)

    client.BrokerClient.start = traced_start  # type: ignore[method-assign]


def _trace_worker(note: Any) -> None:
    from workers.base import BaseModelWorker

    on_control = BaseModelWorker._on_control

    def traced_on_control(self: Any, data: bytes) -> None:
        with contextlib.suppress(Exception):
            note("control", getattr(control(data), "rid", "-"))
        on_control(self, data)

    BaseModelWorker._on_control = traced_on_control  # type: ignore[method-assign]

    job_done = BaseModelWorker._job_done

    def traced_job_done(self: Any, request_id: str) -> None:
        note("job_done", request_id)
        job_done(self, request_id)

    BaseModelWorker._job_done = traced_job_done  # type: ignore[method-assign]

    generation = BaseModelWorker._generation

    def traced_generation(self: Any, job: Any) -> Any:
        """The job's events, noting when each token was generated (one line when the job's generation ends)."""
        events = generation(self, job)

        async def timed() -> Any:
            times: list[float] = []
            try:
                async for ev in events:
                    if isinstance(ev, Delta):
                        times += [time.monotonic()] * ev.tokens
                    yield ev
            finally:
                note("gen", job.request_id + ":" + ",".join(f"{t:.4f}" for t in times))

        return timed()

    BaseModelWorker._generation = traced_generation  # type: ignore[method-assign]

    control_loop = BaseModelWorker._control_loop

    async def traced_control_loop(self: Any) -> None:
        _lag_probe(note)
        await control_loop(self)

    BaseModelWorker._control_loop = traced_control_loop  # type: ignore[method-assign]


_probes: set[asyncio.Task[None]] = set()
#: Bytes of reply messages the gateway's router handed on since the lag probe last woke.
_routed = [0]


def _lag_probe(note: Any, every: float = 0.005) -> None:
    """Note the event loop's lag (``lag <ms>/<KB> <t>``): how late a ``sleep(every)`` wakes, every time, and
    how many KB of reply messages the router handed on meanwhile (0 in a worker)."""

    async def probe() -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(every)
            note("lag", f"{(time.monotonic() - t0 - every) * 1000:.2f}/{_routed[0] / 1024:.1f}")
            _routed[0] = 0

    _probes.add(asyncio.get_running_loop().create_task(probe()))


#: The stages in the order a cancel goes through them, and where each is timed.
STAGES = [
    ("lost", "gateway: uvicorn connection_lost (any connection)"),
    ("listener", "gateway: sse-starlette's disconnect listener returns"),
    ("release", "gateway: _sse's finally enters _release"),
    ("publish", "gateway: cancel.lua answered, PUBLISH Cancel sent"),
    ("published", "gateway: PUBLISH answered"),
    ("tap_cancel", "Redis: Cancel seen on the control channel (tap)"),
    ("control", "worker: _on_control runs (task.cancel())"),
    ("tap_end", "Redis: the worker's 'cancelled' reply seen (tap)"),
    ("job_done", "worker: the job's task is done (retired)"),
]


def read_trace(directory: str, streams: list[Opened], by_rid: dict[str, Seen], t_idle: float) -> dict[str, Any]:
    """Each stage's time after the drop, in ms: per request where the stage names one, else after the first
    drop (uvicorn and sse-starlette stages, which know no request id). And each process's event-loop lag
    (how late a 5 ms sleep woke) in the second before the first drop and from it until every job ended, and its
    longest stalls with the KB of reply messages the gateway's router handed on during each."""
    drops = {s.rid: s.t_drop for s in streams if s.rid and not s.error}
    first_drop = min(drops.values(), default=0.0)
    times: dict[str, list[float]] = {stage: [] for stage, _ in STAGES}
    lags: dict[str, dict[str, list[float]]] = {}
    stalls: dict[str, list[tuple[float, float, float]]] = {}
    generated: dict[str, int] = {}
    for path in Path(directory).glob("*.log"):
        role = path.name.split("-")[0]
        for line in path.read_text().splitlines():
            stage, rid, t = line.split()
            if stage == "gen":  # the worker's own clock on each token of a job
                job, _, stamps = rid.partition(":")
                if job in drops and stamps:
                    generated[job] = sum(1 for x in stamps.split(",") if float(x) > drops[job])
                continue
            if stage == "lag":
                when = "before" if first_drop - 1 <= float(t) < first_drop else \
                    "after" if first_drop <= float(t) <= t_idle else ""
                lag, kb = (float(x) for x in rid.split("/"))
                if when:
                    lags.setdefault(role, {"before": [], "after": []})[when].append(lag)
                    stalls.setdefault(role, []).append((lag, kb, (float(t) - first_drop) * 1000))
                continue
            ref = drops.get(rid) if rid != "-" else first_drop
            if ref is not None and stage in times and float(t) >= first_drop:
                times[stage].append((float(t) - ref) * 1000)
    for rid, seen in by_rid.items():
        if rid in drops and seen.t_cancel is not None:
            times["tap_cancel"].append((seen.t_cancel - drops[rid]) * 1000)
        if rid in drops and seen.t_end is not None and seen.t_end > drops[rid]:
            times["tap_end"].append((seen.t_end - drops[rid]) * 1000)
    ended = {rid: seen.t_end for rid, seen in by_rid.items() if seen.t_end is not None}
    live = [rid for rid, t in drops.items() if ended.get(rid, t + 1) > t]
    return {"stages": {stage: {**dist(times[stage]), "what": what} for stage, what in STAGES},
            # per request, by the worker's clock: tokens its engine yielded after that client's reset
            "generated_after": dist([float(generated[rid]) for rid in live if rid in generated]),
            "loop_lag_ms": {role: {k: dist(v) for k, v in w.items()} for role, w in sorted(lags.items())},
            # the five longest: lag ms, KB of replies the router handed on meanwhile, ms after the first drop
            "stalls": {role: [[round(x, 1) for x in row] for row in sorted(rows, reverse=True)[:5]]
                       for role, rows in sorted(stalls.items())}}


# --- py-spy during the drop (--profile) ----------------------------------------------------------------------


def start_profiles(st: Stack, workers: int, seconds: float, out: Path, n: int) -> dict[str, tuple[Path, Any]]:
    spy = Path(sys.executable).with_name("py-spy")
    out.mkdir(parents=True, exist_ok=True)
    targets = {"gateway": st.main_pid, "worker": st.pids[0]}
    return {name: (out / f"cancel-{name}-{n}.txt", subprocess.Popen(
        [str(spy), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "250",
         "--format", "raw", "--nonblocking", "--output", str(out / f"cancel-{name}-{n}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)) for name, pid in targets.items()}


def profile_summary(path: Path, top: int = 14) -> dict[str, Any]:
    """Self and inclusive shares of the frames of one raw py-spy profile (idle waits left in: they show
    how much of the window the process had nothing to do)."""
    from bench.profile import collapse

    if not path.exists():
        return {"samples": 0}
    total, frames, files = collapse(path)
    inclusive: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        for frame in set(stack.split(";")):
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
    share = (lambda n: round(n / total, 3)) if total else (lambda n: 0.0)
    mine = {f: c for f, c in inclusive.items() if any(k in f for k in ("gateway/", "broker/", "workers/",
                                                                         "sse_starlette", "uvicorn/protocols"))}
    return {"samples": total, "file": str(path),
            "self": [[f, share(c)] for f, c in frames.most_common(top)],
            "self_by_file": [[f, share(c)] for f, c in files.most_common(top // 2)],
            "inclusive": [[f, share(c)] for f, c in sorted(mine.items(), key=lambda kv: -kv[1])[:top]]}


# --- one measurement ----------------------------------------------------------------------------------------


def _cpu(st: Stack, workers: int, tap: Tap) -> dict[str, float]:
    return {"loadgen": time.process_time(), "gateway": tree_cpu_seconds(st.main_pid),
            "workers": sum(tree_cpu_seconds(p) for p in st.pids[:workers]),
            "redis": tree_cpu_seconds(st.pids[-1]), "tap": tap.cpu()}


def _delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(b[k] - a[k], 3) for k in a}


async def _drive(st: Stack, tap: Tap, n: int, o: argparse.Namespace, profile_out: Path | None) -> dict[str, Any]:
    host, port = st.url.removeprefix("http://").split(":")
    for s in await asyncio.gather(*(open_stream(host, int(port), -k, o.max_tokens, until_done=True)
                                    for k in range(1, 5))):  # warm-up: four whole streams
        if s.writer is not None:
            s.writer.close()
    await asyncio.to_thread(until_idle_sync, st)
    counted = await asyncio.to_thread(worker_counters, st)
    c0, t0 = time.process_time(), time.monotonic()
    results = await asyncio.gather(*(asyncio.wait_for(open_stream(host, int(port), i, o.max_tokens), o.ramp_timeout)
                                     for i in range(n)), return_exceptions=True)
    streams = [r if isinstance(r, Opened) else Opened(i, error=f"{type(r).__name__}: {r}")
               for i, r in enumerate(results)]
    ramp = {"ramp_s": round(time.monotonic() - t0, 3), "loadgen_cpu_ramp_s": round(time.process_time() - c0, 3)}
    spies = start_profiles(st, o.workers, o.profile, profile_out, n) if profile_out is not None else {}
    if spies:
        await asyncio.sleep(0.3)  # py-spy attaches
    before = await asyncio.to_thread(_cpu, st, o.workers, tap)
    c1 = time.process_time()
    drop(streams)
    await asyncio.sleep(0)  # the resets go out
    drop_cpu, spread = time.process_time() - c1, (time.monotonic() - streams[0].t_drop) * 1000
    t_idle = await until_idle(st, o.max_tokens * o.delay * 4 + 60)
    after = await asyncio.to_thread(_cpu, st, o.workers, tap)
    await asyncio.sleep(0.3)  # the last messages reach the tap
    for _, proc in spies.values():
        proc.wait(60)
    return {"streams": streams, "ramp": ramp, "counted": counted, "t_idle": t_idle,
            "final": await asyncio.to_thread(worker_counters, st), "spies": spies,
            "drop": {"drop_spread_ms": round(spread, 3), "loadgen_cpu_drop_s": round(drop_cpu, 4),
                     "window_s": round(t_idle - streams[0].t_drop, 3), "cpu_window_s": _delta(before, after)}}


def until_idle_sync(st: Stack, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while worker_counters(st)["running"] and time.monotonic() < end:
        time.sleep(0.05)


def measure(n: int, o: argparse.Namespace, *, trace: bool = False) -> dict[str, Any]:
    """One N on a fresh stack; ``trace`` instruments the gateway and the workers (see ``install_trace``)."""
    with contextlib.ExitStack() as ctx:
        trace_dir = ctx.enter_context(tempfile.TemporaryDirectory(prefix="cancel-trace-")) if trace else None
        if trace_dir is not None:
            ctx.enter_context(traced_env(trace_dir))
        st = ctx.enter_context(redserve(o.workers, o.delay, o.max_tokens, gateways=o.gateways))
        tap = Tap(st.redis_url or "")
        try:
            profile_out = Path(o.profile_out) if o.profile and trace == o.profile_traced else None
            got = asyncio.run(_drive(st, tap, n, o, profile_out))
        finally:
            records = tap.stop()
        by_rid = sort_tap(records)
        streams: list[Opened] = got["streams"]
        rows = per_request(streams, by_rid)
        before_all = sum(k for s in streams if s.rid for t, k in by_rid.get(s.rid, Seen()).messages if t <= s.t_drop)
        out: dict[str, Any] = {
            "n": n, "traced": trace, "errors": [s.error for s in streams if s.error][:5],
            "error_count": sum(1 for s in streams if s.error), **got["ramp"], **got["drop"],
            **summarise(rows, got["final"]["generated"] - got["counted"]["generated"], before_all),
            "tap_messages": len(records),
        }
        if trace_dir is not None:
            out.update(read_trace(trace_dir, streams, by_rid, got["t_idle"]))
        if got["spies"]:
            out["profile"] = {name: profile_summary(path) for name, (path, _) in got["spies"].items()}
        return out


# --- the report ---------------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _verdict(r: dict[str, Any]) -> str:
    """Whether a plain N = 500 run meets the target (only a run with every stream still live at the drop)."""
    if r["n"] != 500 or r["traced"]:
        return ""
    if r["ended_before_drop"] or r["error_count"]:
        return "(not every stream live)"
    return "yes" if (r["after"]["p99"] or 0) <= TARGET_P99 else "**no**"


def _row(r: dict[str, Any]) -> str:
    a, c, s, cpu = r["after"], r["cancel_ms"], r["stop_ms"], r["cpu_window_s"]
    cells = [str(r["n"]), "yes" if r["traced"] else "", str(r["streams"] - r["ended_before_drop"]),
             _f(a["mean"], 2), _f(a["p50"]), _f(a["p99"]), _f(a["max"], 0), _f(r["after_generated_mean"], 2),
             f"{_f(c['p50'], 0)} / {_f(c['p99'], 0)}", f"{_f(s['p50'], 0)} / {_f(s['p99'], 0)}",
             _f(r["token_ms"]["p50"]), _f(r["tap_lead_ms"]["p50"], 0), _f(r["drop_spread_ms"]),
             f"{_f(r['loadgen_cpu_drop_s'], 3)} / {_f(cpu['loadgen'], 2)}", _f(cpu["gateway"], 2), _verdict(r)]
    return "| " + " | ".join(cells) + " |"


def render(data: dict[str, Any]) -> list[str]:
    """The markdown section for bench/RESULTS.md."""
    m = data["meta"]
    lines = [
        "## Cancellation under load",
        "",
        f"Generated by `python -m bench.cancel` on {m['date']}, {m['machine']}, tree {m.get('tree', '?')}: "
        f"{m.get('gateways', 1)} gateway "
        f"process(es), {m['workers']} echo worker(s), echo delay {m['delay_ms']:g} ms, {m['max_tokens']} tokens "
        "per reply. N streams opened at once, each read to its first content token, then every connection reset "
        "in one loop. *Live*: streams whose job had not ended by the reset (only those are counted). *After* = "
        "tokens the worker published after that client's reset (seen by a tap on the reply channels); "
        "*generated after* = the workers' generated-token counter minus what was published before the resets, "
        "per request (tokens cut off unpublished included). Times in ms after each reset: *Cancel* = the "
        "gateway's Cancel on the worker's control channel, *stopped* = the worker's last message. *ms/token*: "
        "the worker's actual pace per stream just before the reset; *lead*: how long before the client the tap "
        "saw a stream's first token (the gateway's backlog). Loadgen CPU: the client's own CPU seconds for the "
        "reset loop / the whole window until every job ended.",
        "",
        "| N | traced | live | after mean | p50 | p99 | max | generated after, mean | Cancel p50 / p99 | "
        "stopped p50 / p99 | ms/token | lead | reset loop ms | loadgen CPU reset / window s | "
        f"gateway CPU window s | p99 ≤ {TARGET_P99:g} at N = 500 |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
        *(_row(r) for r in data["runs"]),
    ]
    for r in data["runs"]:
        if not r.get("stages"):
            continue
        lines += ["", f"Stages of the cancel path, N = {r['n']} (instrumented run; ms after each reset):", "",
                  "| stage | p50 | p99 | max | count |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {d['what']} | {_f(d['p50'])} | {_f(d['p99'])} | {_f(d['max'])} | {d['n']} |"
                  for d in r["stages"].values()]
        if g := r.get("generated_after"):
            lines.append(f"\nTokens the worker's engine yielded after each reset, by its own clock (instrumented run): "
                         f"mean {_f(g['mean'], 2)}, p50 {_f(g['p50'])}, p99 {_f(g['p99'])}, max {_f(g['max'], 0)}.")
        for role, lag in r.get("loop_lag_ms", {}).items():
            b, af = lag.get("before", {}), lag.get("after", {})
            lines.append(f"\n{role} event-loop lag (a 5 ms sleep's overshoot), ms: the second before the reset "
                         f"p50 {_f(b.get('p50'))}, max {_f(b.get('max'))}; from the reset until every job ended "
                         f"p50 {_f(af.get('p50'))}, max {_f(af.get('max'))}.")
    return lines


def _tree() -> str:
    """The commit measured, and the serving code's uncommitted changes (others edit it while benchmarks run)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "broker", "gateway", "workers", "redserve")
             .splitlines()]
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return f"{head} + {len(dirty)} uncommitted: {', '.join(dirty)}" if dirty else head


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--streams", type=int, nargs="+", default=[20, 500])
    p.add_argument("--delay", type=float, default=0.02, help="seconds between echo tokens")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gateways", type=int, default=1)
    p.add_argument("--ramp-timeout", type=float, default=120.0, help="seconds a stream may take to its first token")
    p.add_argument("--repeat", type=int, default=1, help="plain runs of each N (a fresh stack each)")
    p.add_argument("--trace", action="store_true", help="also run each N with the gateway and workers instrumented")
    p.add_argument("--profile", type=float, default=0.0, help="py-spy the gateway and a worker this many seconds")
    p.add_argument("--profile-traced", action="store_true", help="profile the traced run rather than the plain one")
    p.add_argument("--profile-out", default=str(ROOT / "bench" / "profiles"))
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "cancel.json")
    p.add_argument("--render", action="store_true", help="only print the markdown of --json")
    p.add_argument("--tap", nargs=2, metavar=("REDIS_URL", "OUT"), help=argparse.SUPPRESS)
    return p


def main() -> None:
    o = parser().parse_args()
    if o.tap:
        tap_main(*o.tap)
        return
    if o.render:
        print("\n".join(render(json.loads(o.json.read_text()))))
        return
    data: dict[str, Any] = {"meta": {"tree": _tree(),
        "argv": sys.argv[1:], "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs", "workers": o.workers,
        "gateways": o.gateways, "delay_ms": o.delay * 1000, "max_tokens": o.max_tokens}, "runs": []}
    for n in o.streams:
        for traced in [False] * o.repeat + ([True] if o.trace else []):
            run = measure(n, o, trace=traced)
            data["runs"].append(run)
            brief = {k: run[k] for k in ("n", "traced", "error_count", "ended_before_drop", "ramp_s", "after",
                                         "after_generated_mean", "cancel_ms", "stop_ms", "drop_spread_ms",
                                         "loadgen_cpu_drop_s", "cpu_window_s")}
            print(json.dumps(brief), flush=True)
            o.json.write_text(json.dumps(data, indent=1))
    print("\n".join(render(data)))


if __name__ == "__main__":
    main()
