"""The transformers engine against its own limit: tokens/s through the gateway next to the model's own speed.

    python -m bench.engine_limit                          # C = 1 8 32, 64 tokens a reply, the tiny model
    python -m bench.engine_limit -c 1 8 --max-tokens 32 --no-profile --what-if-threads 0 --json /tmp/e.json

For each concurrency C, on this machine and with the same weights (``--model-path``, or the tiny model that
``redserve tiny-model`` builds, made in a temporary directory), three figures:

* gateway: completion tokens/s of C streamed ``/v1/completions`` requests at a time (closed loop: each of C
  lanes sends its next request when its last one ended), one fixed prompt, greedy, ``ignore_eos`` so every
  reply is exactly ``--max-tokens`` tokens (checked on each reply's usage), through one gateway process, one hf
  worker and a private Redis (bench.redserve_stack), this process being the client.
* limit: in a process of its own, the weights loaded as the worker loads them (workers.hf.loading.load_model:
  the same dtype and device; torch threads left at torch's default, as the worker leaves them), the prompt
  prefilled as one batch of C rows, then ``max_tokens - 1`` forward passes with the KV cache over all
  C rows, greedy argmax of the batch, the tokens read back to the host each step: the model's speed at batch C
  with nothing around it. Run in that process's main thread, the only one there that runs torch.
* engine alone: in a process of its own, threaded as the worker is (model loaded in the event loop's pool
  thread, then one compute thread for good), the worker's BatchEngine fed by C lanes of requests handed over
  as the worker does (its compute thread's relay into a uvloop event loop): no Redis, gateway or HTTP.

Every process is started (and loaded) first; then, for each C, ``--repeats`` rounds, each one run of every
part in turn, so that slow drifts of the shared machine hit all parts alike. A run lasts ``--min-seconds`` at
least (whole decodes or requests); each figure is the median of its runs, and each run records the CPU that
processes other than the measured ones took meanwhile (/proc/stat less the measured processes' own).

Where the difference goes, each measured on a run of its own (a probe slows what it measures, so never in
the runs whose tokens/s are reported):

* engine breakdown: an engine-alone run with timers wrapped around the engine's functions in that process
  (workers/ is not modified): the compute thread's exclusive wall time per part, per token.
* serving CPU: over the gateway runs, the CPU time of each process and of each worker thread
  (/proc/PID/task/TID/schedstat: on a CPU, and for the compute thread also waiting on the run queue for one),
  the worker's threads named by ``py-spy dump``; what the machine spent besides (/proc/stat) is "other
  processes", the rest of ``CPUs x wall`` idle.
* compute-thread profile: a gateway run at C sampled by ``py-spy record --idle`` on the worker; the compute
  thread's samples (wall time: on a CPU, or waiting for a core, the GIL or work) sorted into the engine's parts.
* what-if (``--what-if-threads N``, 0: none): every part again, its processes under ``OMP_NUM_THREADS=N``,
  in the same rounds.

Writes everything as JSON (``--json``); ``render(data)`` gives the markdown tables. ``--role limit|engine``
runs one part's process (commands on stdin, JSON lines on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from bench.redserve_stack import Stack, cpu_seconds, descendants, redserve

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the worker processes inherit it

PROMPT = "The quick brown fox jumps over the lazy dog. A model worker reads jobs from a stream"
DEFAULT_JSON = Path("bench/engine_limit.json")


@dataclasses.dataclass
class Options:
    concurrency: list[int]
    max_tokens: int = 64
    requests_per_lane: int = 4
    #: At least this many requests per gateway run (C lanes of ``requests_per_lane``, or more).
    min_requests: int = 16
    repeats: int = 5
    #: A limit or engine-alone run repeats its decodes until it has lasted this long.
    min_seconds: float = 0.5
    model_path: Path | None = None
    profile: bool = True
    profile_seconds: float = 3.0
    profile_rate: int = 50
    #: torch threads of the what-if parts (0: none).
    what_if_threads: int = 1
    #: A run during which other processes took more than this share of the machine is run again, up to
    #: ``tries`` times in all (the last one counts, its share recorded).
    max_others: float = 0.05
    tries: int = 3

    def requests(self, c: int) -> int:
        return c * max(self.requests_per_lane, -(-self.min_requests // c))


# --- the limit: the model alone, batch C -------------------------------------------------------------------
def limit_run(loaded: Any, ids: list[int], c: int, n: int, *, masked: bool = False) -> dict[str, float]:
    """One batched greedy decode of ``n`` tokens for ``c`` copies of ``ids``: tokens and seconds per phase.

    ``masked``: also pass a growing attention mask and position ids each step, as the worker's KVBatch does
    (its rows may be left-padded); the plain run needs neither (all rows are the same length)."""
    import torch
    from transformers import DynamicCache

    from workers.hf.kv import cache_keyword, forward_parameters

    model, by = loaded.model, cache_keyword(loaded.model)  # the keywords the worker passes, as it passes them
    keep = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}
    with torch.inference_mode():
        batch = torch.tensor([ids] * c, dtype=torch.long, device=loaded.device)
        start = time.perf_counter()
        cache = DynamicCache()
        out = model(input_ids=batch, use_cache=True, **{by: cache}, **keep)
        tokens = out.logits[:, -1].float().argmax(-1)
        tokens.tolist()
        prefilled = time.perf_counter()
        mask = torch.ones(c, len(ids), dtype=torch.long, device=loaded.device)
        positions = torch.full((c, 1), len(ids), dtype=torch.long, device=loaded.device)
        for _ in range(n - 1):
            if masked:
                mask = torch.cat([mask, mask.new_ones(c, 1)], dim=1)
                out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                            use_cache=True, **{by: cache})
                positions = positions + 1
            else:
                out = model(input_ids=tokens[:, None], use_cache=True, **{by: cache})
            tokens = out.logits[:, -1].float().argmax(-1)
            tokens.tolist()  # a server must read each step's tokens on the host: counted
        wall = time.perf_counter() - start
    return {"tokens": c * n, "wall_s": wall, "prefill_s": prefilled - start}


def limit_for(loaded: Any, ids: list[int], c: int, n: int, min_seconds: float) -> dict[str, float]:
    """Whole decodes until ``min_seconds`` passed, plain; then as many masked ones."""
    def until(masked: bool) -> dict[str, float]:
        total = {"tokens": 0.0, "wall_s": 0.0, "prefill_s": 0.0}
        while total["wall_s"] < min_seconds or not total["tokens"]:
            for k, v in limit_run(loaded, ids, c, n, masked=masked).items():
                total[k] += v
        return total

    plain, masked = until(False), until(True)
    return {"tok_s": plain["tokens"] / plain["wall_s"], "prefill_share": plain["prefill_s"] / plain["wall_s"],
            "masked_tok_s": masked["tokens"] / masked["wall_s"]}


# --- the engine alone ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Open:
    """A running timer: its part, and the seconds spent in the timers opened inside it."""

    part: str
    nested: float = 0.0


class Timers:
    """Exclusive wall time of each part of the engine, from timers wrapped around its functions.

    Every wrapped function runs on the compute thread, so one stack of open timers is enough: a timer's
    time less that of the timers opened inside it is its part's own."""

    ADMISSION = "admission (prefill call, first token)"

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: list[_Open] = []
        self.steps = self.rows = self.padding = self.cells = 0

    def timed(self, part: str | Callable[[], str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = _Open(part if isinstance(part, str) else part())
            self._open.append(frame)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self._open.pop()
                self.seconds[frame.part] = self.seconds.get(frame.part, 0.0) + dt - frame.nested
                if self._open:
                    self._open[-1].nested += dt

        return timed

    def model_part(self) -> str:
        return "prefill forward" if any(f.part == self.ADMISSION for f in self._open) else "decode forward"

    def count_padding(self, batch: Any) -> None:
        self.steps += 1
        self.rows += len(batch)
        self.padding += int((batch.mask == 0).sum())
        self.cells += batch.mask.numel()

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """The engine's classes with timers around their parts (restored on exit)."""
        import workers.hf.engine as engine_module
        from workers.hf.engine import BatchEngine, ComputeThread, Relay
        from workers.hf.grammar import Masks
        from workers.hf.kv import KVBatch
        from workers.hf.text import IncrementalDecoder
        from workers.stops import StopMatcher

        parts: list[tuple[Any, str, str]] = [
            (ComputeThread, "_arrivals", "between steps: arrivals, waiting for work"),
            (Relay, "flush", "hand-off to the event loop"),
            (BatchEngine, "_admit", self.ADMISSION),
            (KVBatch, "add", "admission: join the KV batch (pad, cat)"),
            (KVBatch, "keep", "batch bookkeeping (keep, set_tokens)"),
            (KVBatch, "set_tokens", "batch bookkeeping (keep, set_tokens)"),
            (engine_module, "choose_token", "sampling (choose_token, _adjusted)"),
            (BatchEngine, "_adjusted", "sampling (choose_token, _adjusted)"),
            (IncrementalDecoder, "push", "detokenisation"),
            (IncrementalDecoder, "flush", "detokenisation"),
            (StopMatcher, "feed", "stop strings"),
            (StopMatcher, "flush", "stop strings"),
            (Masks, "apply", "grammar masks"),
            (BatchEngine, "_tick", "engine Python per step and row (the rest of _step, _advance)"),
        ]
        saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in parts]
        saved.append((KVBatch, "forward", KVBatch.__dict__["forward"]))
        for owner, name, part in parts:
            setattr(owner, name, self.timed(part, owner.__dict__[name]))
        forward = self.timed("decode step: mask and positions (KVBatch.forward)", KVBatch.__dict__["forward"])
        count = self.timed("(instrumentation: counting padding)", self.count_padding)

        def counted_forward(batch: Any, model: Any, **extra: Any) -> Any:
            count(batch)
            return forward(batch, model, **extra)

        setattr(KVBatch, "forward", counted_forward)  # noqa: B010 - restored with the others
        try:
            yield
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)


class _TimedModel:
    """The model, with a timer around each call (prefill or decode, by the timer open around it)."""

    def __init__(self, model: Any, timers: Timers) -> None:
        self._model, self._call = model, timers.timed(timers.model_part, model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


async def engine_run(engine: Any, ids: list[int], c: int, n: int, per_lane: int,
                     timers: Timers | None = None) -> dict[str, float]:
    """C lanes of ``per_lane`` requests each through the worker's BatchEngine, relayed as the worker relays
    (the compute thread's relay into this event loop). ``timers``: with the engine's parts timed."""
    from broker.protocol import Done, Generate

    params = Generate(prompt=PROMPT, max_tokens=n, temperature=0.0, ignore_eos=True)

    async def one() -> int:
        events: asyncio.Queue[Any] = asyncio.Queue()
        gen = engine.submit(ids, params, engine.thread.relay(asyncio.get_running_loop()).outlet(events))
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, BaseException):
                    raise ev
                if isinstance(ev, Done):
                    return int(ev.usage.completion_tokens)
        finally:
            gen.cancel()

    async def lane() -> int:
        return sum([await one() for _ in range(per_lane)])

    loaded = engine.loaded
    if timers is not None:
        engine.loaded = dataclasses.replace(loaded, model=_TimedModel(loaded.model, timers))
    try:
        with timers.patched() if timers is not None else contextlib.nullcontext():
            start = time.perf_counter()
            tokens = sum(await asyncio.gather(*(lane() for _ in range(c))))
            wall = time.perf_counter() - start
    finally:
        engine.loaded = loaded
    if tokens != c * per_lane * n:
        raise RuntimeError(f"engine alone made {tokens} tokens, not {c * per_lane * n}")
    return {"tokens": tokens, "wall_s": wall}


async def engine_for(engine: Any, ids: list[int], c: int, n: int, per_lane: int, min_seconds: float,
                     timed: bool = False) -> dict[str, Any]:
    """Engine runs until ``min_seconds`` passed: tokens/s; ``timed``: under timers, and the breakdown."""
    timers = Timers() if timed else None
    tokens = wall = 0.0
    while wall < min_seconds or not tokens:
        run = await engine_run(engine, ids, c, n, per_lane, timers)
        tokens, wall = tokens + run["tokens"], wall + run["wall_s"]
    out: dict[str, Any] = {"tok_s": tokens / wall}
    if timers is not None:
        us = {part: s / tokens * 1e6 for part, s in sorted(timers.seconds.items(), key=lambda kv: -kv[1])}
        us["(the compute thread outside these)"] = wall / tokens * 1e6 - sum(us.values())
        out |= {"breakdown_us_per_token": us, "steps": timers.steps, "mean_batch": timers.rows / timers.steps,
                "padding_share": timers.padding / timers.cells}
    return out


# --- the limit and the engine alone, each in a process of its own ------------------------------------------
def _load(path: Path) -> Any:
    """The model as the worker loads it (its settings' device, dtype, length and quantization)."""
    from broker.settings import Settings
    from workers.hf.loading import LoadOptions, load_model

    s = Settings()
    return load_model(path, LoadOptions(s.device, s.dtype, s.max_model_len, s.load_in))


def _config(loaded: Any) -> dict[str, Any]:
    import torch
    import transformers

    return {"prompt_tokens": len(_prompt_ids(loaded)), "dtype": str(loaded.model.dtype).removeprefix("torch."),
            "device": str(loaded.device), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def _prompt_ids(loaded: Any) -> list[int]:
    return list(loaded.tokenizer(PROMPT)["input_ids"])  # what the worker makes of a completion's prompt


def _say(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def limit_role(path: Path, o: Options) -> None:
    """The limit's process: loads, says it is ready, then answers ``{"c": C}`` lines with a limit run each."""
    loaded = _load(path)
    ids = _prompt_ids(loaded)
    _say(_config(loaded))
    warm: set[int] = set()
    for line in sys.stdin:
        c = json.loads(line)["c"]
        if c not in warm:
            limit_run(loaded, ids, c, min(o.max_tokens, 4))
            warm.add(c)
        _say(limit_for(loaded, ids, c, o.max_tokens, o.min_seconds))
    os._exit(0)  # all said: skip torch's slow teardown


async def engine_role(path: Path, o: Options) -> None:
    """The engine's process, threaded as the worker is (HFWorker.setup): the model loaded in a thread of the
    event loop's pool, one compute thread for every run. Answers ``{"c": C, "timed": bool}`` lines."""
    from workers.hf.engine import BatchEngine, ComputeThread

    loaded = await asyncio.to_thread(_load, path)
    ids = _prompt_ids(loaded)
    thread = ComputeThread("hf-engine-bench")
    engine = BatchEngine(loaded, thread)
    thread.start()
    _say(_config(loaded))
    warm: set[int] = set()
    try:
        while line := await asyncio.to_thread(sys.stdin.readline):
            ask = json.loads(line)
            c = ask["c"]
            if c not in warm:
                await engine_run(engine, ids, c, min(o.max_tokens, 4), 1)
                warm.add(c)
            _say(await engine_for(engine, ids, c, o.max_tokens, o.requests(c) // c, o.min_seconds, ask["timed"]))
    finally:
        await asyncio.to_thread(thread.close)
    os._exit(0)  # all said: skip torch's slow teardown


class Role:
    """A limit or engine process, started (it imports and loads at once), then asked for one run at a time."""

    def __init__(self, role: str, path: Path, o: Options, threads: int | None) -> None:
        cmd = [sys.executable, "-m", "bench.engine_limit", "--role", role, "--model-path", str(path),
               "--max-tokens", str(o.max_tokens), "--requests-per-lane", str(o.requests_per_lane),
               "--min-requests", str(o.min_requests), "--min-seconds", str(o.min_seconds)]
        env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
        self.role = role
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.role} process ended (exit {self.proc.wait()}); its stderr says why")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ready(self) -> dict[str, Any]:
        return self._read()

    def ask(self, c: int, timed: bool = False) -> dict[str, Any]:
        """One run at C, with the CPU other processes took meanwhile (a share of the machine)."""
        assert self.proc.stdin is not None
        busy, own, start = machine_busy(), cpu_seconds(self.proc.pid), time.perf_counter()
        self.proc.stdin.write(json.dumps({"c": c, "timed": timed}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        others = machine_busy() - busy - (cpu_seconds(self.proc.pid) - own)
        return {**answer, "others_cpu": others / (CPUS * (time.perf_counter() - start))}

    def close(self) -> None:
        """Tell it to end (end of its input); ``wait`` for it."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def wait(self) -> None:
        self.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


CPUS = len(os.sched_getaffinity(0))


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


# --- through the gateway -----------------------------------------------------------------------------------
async def drive(url: str, model: str, c: int, n: int, requests: int = 0,
                stop: threading.Event | None = None) -> dict[str, Any]:
    """C lanes of streamed completions: ``requests`` in all, or until ``stop`` is set. Checks every reply."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    tickets = iter(range(requests))
    tokens, errors = 0, []

    def more() -> bool:
        return not stop.is_set() if stop is not None else next(tickets, None) is not None

    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=c),
                                     timeout=aiohttp.ClientTimeout(total=None, sock_read=120)) as http:
        async def lane() -> None:
            nonlocal tokens
            while more():
                async with http.post("/v1/completions", json=body) as r:
                    if r.status != 200:
                        errors.append(f"HTTP {r.status}: {(await r.read())[:200]!r}")
                        continue
                    got, done = 0, False
                    async for line in r.content:
                        if line.startswith(b"data: [DONE]"):
                            done = True
                            break
                        if line.startswith(b"data: ") and (usage := json.loads(line[6:]).get("usage")):
                            got = usage["completion_tokens"]
                if done and got == n:
                    tokens += got
                else:
                    errors.append(f"incomplete reply: done={done} tokens={got}")

        start = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(c)))
        wall = time.perf_counter() - start
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "errors": errors}


def sched_cpu(pid: int) -> float:
    """CPU seconds of the live threads of ``pid`` and its children, to the nanosecond (/proc schedstat; /proc's
    stat counts 10 ms ticks, too coarse for a short run)."""
    total = 0.0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0]) / 1e9
    return total


def py_spy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))


def thread_names(pid: int, spy: str | None) -> dict[int, str]:
    """The worker's Python threads by native id, from ``py-spy dump`` (empty without py-spy)."""
    if spy is None:
        return {}
    out = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
    return {int(tid): name for tid, name in re.findall(r'^Thread (\d+) \(\w+\): "(.*)"', out, re.M)}


def thread_role(name: str | None) -> str:
    if name is None:
        return "worker: native threads (torch intra-op pools)"
    if name.startswith("hf-engine"):
        return COMPUTE
    return "worker: event loop" if name == "MainThread" else "worker: other Python threads"


COMPUTE = "worker: compute thread"
CLIENT = "client (this process: aiohttp)"


class Gateway:
    """A running stack measured from outside: tokens/s per run, and the CPU each part of it took per C."""

    def __init__(self, st: Stack, spy: str | None) -> None:
        self.st, self.spy = st, spy
        self.names = thread_names(st.pids[0], spy)
        self.cpu: dict[int, defaultdict[str, float]] = {}  # per C: CPU (run-queue) seconds per part, wall, tokens

    def snapshot(self) -> defaultdict[str, float]:
        """CPU seconds of every part of the stack and of the client; run-queue seconds of the compute thread."""
        worker, gateway, redis = self.st.pids[0], self.st.main_pid, self.st.pids[-1]
        parts: defaultdict[str, float] = defaultdict(float)
        if self.names:
            for tid in os.listdir(f"/proc/{worker}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{worker}/task/{tid}/schedstat") as f:
                    on_cpu, waiting = (int(x) / 1e9 for x in f.read().split()[:2])
                role = thread_role(self.names.get(int(tid)))
                parts[role] += on_cpu
                if role == COMPUTE:
                    parts["(compute thread waiting for a CPU)"] += waiting
        else:
            parts["worker"] = sched_cpu(worker)
        parts["gateway"] = sched_cpu(gateway)
        parts["redis"] = sched_cpu(redis)
        parts[CLIENT] = time.process_time()
        parts["(machine busy)"] = machine_busy()
        return parts

    def run(self, c: int, n: int, requests: int) -> dict[str, Any]:
        """One run: tokens/s, the CPU others took meanwhile, and (under ``"cpu"``) what each part took."""
        before, start = self.snapshot(), time.perf_counter()
        res = asyncio.run(drive(self.st.url, self.st.model, c, n, requests))
        wall = time.perf_counter() - start
        used = {k: v - before[k] for k, v in self.snapshot().items()}
        if res["errors"]:
            raise RuntimeError(f"C={c}: {len(res['errors'])} bad replies, first: {res['errors'][0]}")
        ours = sum(v for k, v in used.items() if not k.startswith("("))
        return {"tok_s": res["tok_s"], "others_cpu": (used["(machine busy)"] - ours) / (CPUS * wall),
                "cpu": {**used, "(wall)": wall, "(tokens)": res["tokens"]}}

    def count(self, c: int, run: dict[str, Any]) -> None:
        """Add a run's CPU to C's account (the runs that count only)."""
        acc = self.cpu.setdefault(c, defaultdict(float))
        for k, v in run.pop("cpu").items():
            acc[k] += v

    def cpu_summary(self, c: int) -> dict[str, Any]:
        """CPU µs per token of each part over the runs at C; the compute thread's wall split."""
        acc = self.cpu[c]
        tokens, wall = acc["(tokens)"], acc["(wall)"]
        parts = {k: v / tokens * 1e6 for k, v in acc.items() if not k.startswith("(")}
        parts["other processes"] = (acc["(machine busy)"] - sum(acc[k] for k in parts)) / tokens * 1e6
        parts["idle"] = CPUS * wall / tokens * 1e6 - sum(parts.values())
        out: dict[str, Any] = {"cpu_us_per_token": parts}
        if COMPUTE in acc:
            on_cpu, waiting = acc[COMPUTE] / wall, acc["(compute thread waiting for a CPU)"] / wall
            out["compute_thread"] = {"on a CPU": on_cpu, "runnable, waiting for a CPU": waiting,
                                     "asleep (GIL, OpenMP barrier, no work)": 1 - on_cpu - waiting}
        return out

    def profile(self, c: int, n: int, seconds: float, rate: int, out: Path) -> dict[str, Any]:
        """py-spy on the worker for ``seconds`` in the middle of a gateway run at C that outlasts it."""
        assert self.spy is not None
        stop, box = threading.Event(), dict[str, Any]()
        load = threading.Thread(target=lambda: box.update(asyncio.run(drive(self.st.url, self.st.model, c, n,
                                                                            stop=stop))))
        load.start()
        try:
            time.sleep(0.3)  # past the first arrivals
            spied = subprocess.run([self.spy, "record", "--pid", str(self.st.pids[0]), "--idle", "--threads",
                                    "--nonblocking", "--rate", str(rate), "--duration", str(max(1, round(seconds))),
                                    "--format", "raw", "--output", str(out)],
                                   capture_output=True, text=True, timeout=seconds + 60)
        finally:
            stop.set()
            load.join()
        if spied.returncode != 0 or not out.is_file():
            return {"error": (spied.stderr or spied.stdout).strip()[-300:]}
        return {"tok_s": box.get("tok_s", 0.0), "rate": rate, **classify(out.read_text())}


# --- the compute thread under py-spy ----------------------------------------------------------------------
#: Frames (leaf to root: the first that matches decides) and the part of the engine they are.
_PARTS = [
    ("IncrementalDecoder.", "detokenisation"),
    ("StopMatcher.", "stop strings"),
    ("choose_token (", "sampling (choose_token, _adjusted)"),
    ("BatchEngine._adjusted", "sampling (choose_token, _adjusted)"),
    ("Relay.flush", "hand-off to the event loop"),
    ("KVBatch.add", "admission: join the KV batch (pad, cat)"),
    ("KVBatch.keep", "batch bookkeeping (keep, set_tokens)"),
    ("KVBatch.set_tokens", "batch bookkeeping (keep, set_tokens)"),
    ("Masks.apply", "grammar masks"),
    ("ComputeThread._arrivals", "between steps: arrivals, waiting for work"),
]


def compute_part(frames: list[str]) -> str:
    """The engine part one sample of the compute thread (frames root first) was in."""
    in_model = False
    for frame in reversed(frames):
        for pattern, part in _PARTS:
            if pattern in frame:
                return part
        if "KVBatch.forward" in frame:
            return "decode forward" if in_model else "decode step: mask and positions (KVBatch.forward)"
        if "BatchEngine._admit" in frame:
            return "prefill forward" if in_model else Timers.ADMISSION
        if "BatchEngine." in frame:
            return "engine Python per step and row (the rest of _step, _advance)"
        in_model = in_model or "torch/" in frame or "transformers/" in frame
    return "other"


def classify(raw: str) -> dict[str, Any]:
    """py-spy raw stacks (``--threads``) of the worker: the compute thread's samples by part, the event loop's
    busiest frames."""
    parts: Counter[str] = Counter()
    loop: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        if "hf-engine" in thread:
            parts[compute_part(frames)] += int(count)
        elif thread.endswith("MainThread"):
            loop[frames[-1] if frames else "?"] += int(count)
    total, loop_total = sum(parts.values()), sum(loop.values())
    return {"compute_samples": total,
            "compute_share": {p: k / total for p, k in parts.most_common()} if total else {},
            "event_loop_top": {f: k / loop_total for f, k in loop.most_common(6)} if loop_total else {}}


# --- the whole measurement ----------------------------------------------------------------------------------
def measure(o: Options) -> dict[str, Any]:
    """Start every process, then at each C: rounds of one run of every part, the timed engine run, py-spy."""
    variants: list[int | None] = [None, *([o.what_if_threads] if o.what_if_threads else [])]
    spy = py_spy() if o.profile else None
    with tempfile.TemporaryDirectory(prefix="engine-limit-") as tmp, contextlib.ExitStack() as running:
        if o.model_path is None:
            from workers.tiny_model import build_tiny_model

            path = build_tiny_model(Path(tmp) / "tiny")
        else:
            path = o.model_path
        roles = {(kind, v): Role(kind, path, o, v) for v in variants for kind in ("limit", "engine")}
        for role in roles.values():  # run last first: all are told to end, then each waited for
            running.callback(role.wait)
        for role in roles.values():
            running.callback(role.close)
        stacks = {v: running.enter_context(_stack(o, path, v)) for v in variants}
        configs = {key: role.ready() for key, role in roles.items()}
        gateways = {v: Gateway(st, py_spy()) for v, st in stacks.items()}
        runs: Runs = {}
        for c in o.concurrency:
            _rounds(o, c, roles, gateways, runs, Path(tmp) if spy is not None else None)
        rows = [_row(c, None, runs, gateways[None]) for c in o.concurrency]
        if o.what_if_threads:
            for row in rows:
                row["what_if"] = _row(row["concurrency"], o.what_if_threads, runs, gateways[o.what_if_threads])
    config = {"model": str(path) if o.model_path else "tiny (redserve tiny-model)", **configs[("limit", None)],
              "max_tokens": o.max_tokens, "cpus": CPUS, "repeats": o.repeats, "min_seconds": o.min_seconds,
              "requests": {str(c): o.requests(c) for c in o.concurrency}}
    return {"config": config, "rows": rows, "argv": sys.argv[1:]}


Runs = dict[tuple[str, int | None, int], list[dict[str, Any]]]


def _rounds(o: Options, c: int, roles: dict[tuple[str, int | None], Role], gateways: dict[int | None, Gateway],
            runs: Runs, profiles: Path | None) -> None:
    """At C: ``o.repeats`` rounds of one run of every part, then the timed engine runs and the py-spy runs (into
    ``profiles``; None: none)."""
    for g in gateways.values():
        asyncio.run(drive(g.st.url, g.st.model, c, o.max_tokens, c))  # warm-up at this batch size
    for _ in range(o.repeats):
        for (kind, v), role in roles.items():
            runs.setdefault((kind, v, c), []).append(_quiet(o, functools.partial(role.ask, c)))
        for v, g in gateways.items():
            got = _quiet(o, functools.partial(g.run, c, o.max_tokens, o.requests(c)))
            g.count(c, got)
            runs.setdefault(("gateway", v, c), []).append(got)
    for v, g in gateways.items():
        runs[("timed", v, c)] = [roles[("engine", v)].ask(c, timed=True)]
        if profiles is not None:
            runs[("profile", v, c)] = [g.profile(c, o.max_tokens, o.profile_seconds, o.profile_rate,
                                                 profiles / f"worker-{v}-{c}.txt")]


def _quiet(o: Options, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()`` again while other processes took more than ``o.max_others`` of the machine, ``o.tries`` at most."""
    attempts = 0
    while True:
        got, attempts = run(), attempts + 1
        if got["others_cpu"] <= o.max_others or attempts >= o.tries:
            return {**got, "attempts": attempts}


@contextlib.contextmanager
def _stack(o: Options, path: Path, threads: int | None) -> Iterator[Stack]:
    """One gateway + one hf worker + Redis, the worker under ``OMP_NUM_THREADS=threads`` if given."""
    with contextlib.ExitStack() as running:
        with _omp_threads(threads):  # the stack's processes inherit it when they start
            st = running.enter_context(redserve(1, max_tokens=o.max_tokens, engine="hf", model_path=str(path)))
        yield st


@contextlib.contextmanager
def _omp_threads(threads: int | None) -> Iterator[None]:
    saved = os.environ.get("OMP_NUM_THREADS")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def _row(c: int, v: int | None, runs: Runs, g: Gateway) -> dict[str, Any]:
    def median(kind: str) -> dict[str, Any]:
        got = runs[(kind, v, c)]
        return {**sorted(got, key=lambda r: r["tok_s"])[len(got) // 2], "runs_tok_s": [r["tok_s"] for r in got],
                "others_cpu": statistics.mean(r["others_cpu"] for r in got),
                "attempts": sum(r["attempts"] for r in got)}

    lim, eng, gw = median("limit"), median("engine"), median("gateway")
    timed = runs[("timed", v, c)][0]
    eng |= {k: timed[k] for k in ("breakdown_us_per_token", "steps", "mean_batch", "padding_share")}
    row = {"concurrency": c, "torch_threads": v, "limit": lim, "engine": {**eng, "timed_tok_s": timed["tok_s"]},
           "gateway": {**gw, **g.cpu_summary(c)}, "share": gw["tok_s"] / lim["tok_s"],
           "engine_share": eng["tok_s"] / lim["tok_s"]}
    if ("profile", v, c) in runs:
        row["profile"] = runs[("profile", v, c)][0]
    return row


# --- the tables ----------------------------------------------------------------------------------------------
def render(data: dict[str, Any]) -> list[str]:
    """Markdown: the share table (and the what-if's), then where the rest goes, one column per C (and what-if)."""
    cfg = data["config"]
    rows = data["rows"] + [r["what_if"] for r in data["rows"] if "what_if" in r]
    threads = {r["torch_threads"] for r in rows} - {None}

    def label(r: dict[str, Any]) -> str:
        return f"C={r['concurrency']}" + (f", {r['torch_threads']} thr" if r["torch_threads"] else "")

    out = [f"Model {cfg['model']} ({cfg['dtype']}, {cfg['device']}, {cfg['torch_threads']} torch threads by "
           f"default, {cfg['cpus']} CPUs), prompt {cfg['prompt_tokens']} tokens, {cfg['max_tokens']} tokens "
           f"per reply; medians of {cfg['repeats']} runs."
           + (f" What-if rows: every process under OMP_NUM_THREADS={threads.pop()}." if threads else ""), "",
           "| C | torch threads | gateway tok/s | limit tok/s | share | engine alone tok/s | engine share | "
           "others' CPU during runs |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        others = max(r[k]["others_cpu"] for k in ("gateway", "limit", "engine"))
        out.append(f"| {r['concurrency']} | {r['torch_threads'] or cfg['torch_threads']} | "
                   f"{r['gateway']['tok_s']:,.0f} | {r['limit']['tok_s']:,.0f} | {r['share']:.0%} | "
                   f"{r['engine']['tok_s']:,.0f} | {r['engine_share']:.0%} | {others:.0%} |")

    def table(title: str, cells: list[dict[str, float]], fmt: str) -> list[str]:
        keys = list(dict.fromkeys(k for cell in cells for k in cell))
        return ["", f"| {title} | " + " | ".join(map(label, rows)) + " |", "|---|" + "---:|" * len(rows),
                *(f"| {k} | " + " | ".join(format(cell.get(k, 0.0), fmt) for cell in cells) + " |" for k in keys)]

    out += table("wall µs per token", [{"limit": 1e6 / r["limit"]["tok_s"],
                                        "limit, called as KVBatch calls it (mask, positions)":
                                            1e6 / r["limit"]["masked_tok_s"],
                                        "engine alone": 1e6 / r["engine"]["tok_s"],
                                        "gateway": 1e6 / r["gateway"]["tok_s"]} for r in rows], ",.0f")
    out += table("engine alone under timers: wall µs per token", [r["engine"]["breakdown_us_per_token"] for r in rows],
                 ",.1f")
    out += table("through the gateway: CPU µs per token", [r["gateway"]["cpu_us_per_token"] for r in rows], ",.0f")
    if all("compute_thread" in r["gateway"] for r in rows):
        out += table("compute thread: share of wall (schedstat)", [r["gateway"]["compute_thread"] for r in rows], ".0%")
    if all(r.get("profile", {}).get("compute_share") for r in rows):
        out += table("compute thread under py-spy: share of samples", [r["profile"]["compute_share"] for r in rows],
                     ".0%")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-lane", type=int, default=4)
    p.add_argument("--min-requests", type=int, default=16, help="requests per gateway run, at least")
    p.add_argument("--min-seconds", type=float, default=0.5, help="length of a limit or engine-alone run, at least")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model-path", type=Path, default=None, help="a model directory (default: the tiny model)")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy runs")
    p.add_argument("--profile-seconds", type=float, default=3.0)
    p.add_argument("--profile-rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("--what-if-threads", type=int, default=1, help="torch threads of the what-if runs (0: none)")
    p.add_argument("--max-others", type=float, default=0.05,
                   help="run again a run during which other processes took more of the machine than this")
    p.add_argument("--tries", type=int, default=3, help="runs in all, at most, to get one under --max-others")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--role", choices=["limit", "engine"], help=argparse.SUPPRESS)
    a = p.parse_args()
    o = Options(a.concurrency, a.max_tokens, a.requests_per_lane, a.min_requests, a.repeats, a.min_seconds,
                a.model_path, not a.no_profile, a.profile_seconds, a.profile_rate, a.what_if_threads,
                max_others=a.max_others, tries=a.tries)
    if a.role == "limit":
        limit_role(a.model_path, o)
    elif a.role == "engine":
        from redserve.loop import run

        run(engine_role(a.model_path, o))
    else:
        data = measure(o)
        a.json.write_text(json.dumps(data, indent=1) + "\n")
        print("\n".join(render(data)))
        print(f"\n(written to {a.json})")


if __name__ == "__main__":
    main()
