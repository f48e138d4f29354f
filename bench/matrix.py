"""Benchmark redserve, the direct server, vllm-router and FastChat; write bench/RESULTS.md and bench/results.png.

    python -m bench.matrix            # T=64; delay 0 and 20 ms; C = 1, 16, 64, 256; 1 and 2 workers
    python -m bench.matrix --quick    # C = 1, 64; delay 0 only
    python -m bench.matrix --systems redserve fastchat --delays 0 -c 64 --workers 1
    python -m bench.matrix --render   # rewrite RESULTS.md and the plot from bench/results.json

Each system runs as separate processes (bench.redserve_stack.redserve,
bench.direct.serve, bench.vllm_router_stack.vllm_router, bench.fastchat_stack.fastchat;
vllm-router and FastChat are installed into bench/.venv-vllm-router/ and
bench/.venv-fastchat/ on first use). The direct server has no workers: it runs
once per delay and is the reference for both worker counts; so does
vllm-router, which relays to one direct server. Each run sends
max(rounds x C, min requests) requests after a small warm-up; every reply is
checked (complete, echo text, T tokens). The machine is shared and noisy:
compare the ratios, not the absolute numbers.

For redserve each run also counts Redis commands (INFO commandstats on its
private Redis) and the workers' reply messages (their /metrics). A last run
opens --streams concurrent streams through one gateway (2 workers, --scale-delay between tokens) and
records errors and the gateway's peak RSS; bench.floor then measures a
gateway's CPU per request against FastAPI and sse-starlette alone. RESULTS.md opens with the targets
of the performance issue, each with its measured value.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import signal
import sys
import time
from pathlib import Path

from bench import direct, fastchat_stack, floor, redserve_stack, vllm_router_stack
from bench.loadgen import run

BENCH = Path(__file__).resolve().parent
#: redserve-2gw: the same stack with two gateway processes on its one port (--gateway-processes 2).
SYSTEMS = ("redserve", "redserve-2gw", "direct", "vllm-router", "fastchat")
#: systems without workers of their own: one run per delay, the reference for every worker count
SINGLE = ("direct", "vllm-router")
GATEWAYS = {"redserve": 1, "redserve-2gw": 2}
FIELDS = ["tokens_per_s", "chunks_per_s", "ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms", "errors",
          "server_cpu_s", "reply_cmds_per_msg", "redis_cmds_per_token"]


def stack(system: str, workers: int, delay: float, max_tokens: int) -> contextlib.AbstractContextManager:
    if system in GATEWAYS:
        return redserve_stack.redserve(workers, delay, max_tokens, gateways=GATEWAYS[system])
    if system == "direct":
        return direct.serve(delay)
    if system == "vllm-router":
        return vllm_router_stack.vllm_router(delay)
    return fastchat_stack.fastchat(workers, delay)


def measure(a: argparse.Namespace) -> list[dict]:
    rows = []
    for delay_ms in a.delays:
        delay = delay_ms / 1000
        for system in a.systems:
            for workers in ([1] if system in SINGLE else a.workers):
                t0 = time.perf_counter()
                with stack(system, workers, delay, a.max_tokens) as st:
                    kw = {"check_echo": True, "count_chunks": system == "fastchat"}
                    asyncio.run(run(st.url, st.model, 4, 8, a.max_tokens, **kw))  # warm-up
                    for c in a.concurrency:
                        n = max(a.rounds * c, a.min_requests if delay == 0 else a.min_requests_delayed)
                        before, counted = st.cpu(), st.counters()
                        res = asyncio.run(run(st.url, st.model, c, n, a.max_tokens, **kw))
                        use = redserve_stack.redis_use(counted, st.counters(), res.tokens, res.chunks)
                        row = {"system": system, "workers": workers, "delay_ms": delay_ms, "concurrency": c,
                               **{k: round(v, 2) for k, v in res.summary().items()},
                               "server_cpu_s": round(st.cpu() - before, 2),
                               **{k: round(v, 4) for k, v in use.items()}}
                        if res.errors:
                            row["first_error"] = res.errors[0][:200]
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                print(f"# {system} workers={workers} delay={delay_ms}ms: {time.perf_counter() - t0:.0f}s",
                      file=sys.stderr, flush=True)
    return rows


def scale(a: argparse.Namespace) -> dict:
    """``a.streams`` concurrent streams (``a.scale_delay`` between tokens) through one gateway process: errors, TTFT
    and the gateway's peak RSS. Two echo workers, each taking every stream (nothing waits in a queue)."""
    workers, delay = 2, a.scale_delay
    with redserve_stack.redserve(workers, delay, a.max_tokens, extra={"max_concurrency": a.streams}) as st:
        asyncio.run(run(st.url, st.model, 4, 8, a.max_tokens))
        res = asyncio.run(run(st.url, st.model, a.streams, a.streams, a.max_tokens, check_echo=True))
        out = {"streams": a.streams, "workers": workers, "delay_ms": delay * 1000, "max_tokens": a.max_tokens,
               **{k: round(v, 2) for k, v in res.summary().items()},
               "gateway_peak_rss_mb": round(st.gateway_peak_rss_mb(), 1)}
    if res.errors:
        out["first_error"] = res.errors[0][:200]
    print(json.dumps(out), flush=True)
    return out


def fmt(v: float | None) -> str:
    if v is None or v != v:  # missing, nan
        return "–"
    if abs(v) < 1:
        return f"{v:.3f}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}×" if a and b and a == a and b == b else "–"


def _get(rows: list[dict], system: str, workers: int, delay: float, c: int) -> dict | None:
    if system in SINGLE:
        workers = 1
    return next((r for r in rows if (r["system"], r["workers"], r["delay_ms"], r["concurrency"])
                 == (system, workers, delay, c)), None)


#: The performance issues' bounds: TTFT p50 at C = 1 (ms); one gateway process's share of the ideal at delay
#: 20 ms, C = 256; a gateway's CPU per request against FastAPI + sse-starlette's; tokens after a disconnect (p99,
#: 500 dropped); the transformers engine's share of its own limit at C = 8.
TTFT_MS, ONE_PROCESS_SHARE, FLOOR_RATIO, CANCEL_P99, ENGINE_SHARE = 1.5, 0.9, 1.2, 3, 0.8


def _share_target(rows: list[dict], system: str, name: str, w: int, r: dict) -> tuple[str, str, bool]:
    """Delay 20 ms, C = 256: one process at least ONE_PROCESS_SHARE of the ideal; two at least the direct server's."""
    share = r["tokens_per_s"] / (256 * 50)
    refs = {s: o["tokens_per_s"] / (256 * 50) for s in SINGLE if (o := _get(rows, s, w, 20.0, 256))}
    others = "".join(f"; {s}: {v:.0%}" for s, v in refs.items())
    measured = f"{r['tokens_per_s']:,.0f} tok/s = {share:.0%}{others}"
    if system == "redserve":
        return (f"{name}, delay 20 ms, C = 256, {w} worker(s): at least {ONE_PROCESS_SHARE:.0%} of the ideal "
                "256 x 50 tok/s", measured, share >= ONE_PROCESS_SHARE)
    return (f"{name}, delay 20 ms, C = 256, {w} worker(s): at least the direct server's share of the ideal",
            measured, "direct" in refs and share >= refs["direct"])


def side_targets(floors: list[dict] | None, side: dict[str, dict]) -> list[tuple[str, str, bool | None]]:
    """The targets measured outside the matrix's runs: the per-request floor, cancellation, the soak, the engine."""
    out: list[tuple[str, str, bool | None]] = []
    by = {f["server"]: f["cpu_us_per_request"] for f in floors or []}
    if "redserve gateway" in by and "fastapi + sse-starlette" in by:
        x = by["redserve gateway"] / by["fastapi + sse-starlette"]
        out.append((f"gateway CPU per request at most {FLOOR_RATIO:g}x FastAPI + sse-starlette's (bench.floor)",
                    f"{by['redserve gateway']:,} µs against {by['fastapi + sse-starlette']:,} µs = {x:.2f}x",
                    x <= FLOOR_RATIO))
    if cancel := side.get("cancel"):
        runs = [r for r in cancel["runs"] if r["n"] == 500 and not r.get("traced") and r["after"]["n"]]
        if runs:
            p99s = [r["after"]["p99"] for r in runs]
            out.append((f"tokens generated after the disconnect, p99, 500 streams dropped at once: at most "
                        f"{CANCEL_P99} (bench.cancel)", ", ".join(f"{p:g}" for p in p99s) + f" in {len(runs)} runs",
                        max(p99s) <= CANCEL_P99))
    if soak := side.get("soak"):
        v = soak["verdict"]
        ok = all(v[k] for k in ("memory_ok", "errors_ok", "keys_ok", "scores_ok"))
        out.append((f"{soak['minutes']:g}-minute soak at {soak['rate']:g} req/s: memory flat, 0 errors, no key "
                    "without a TTL, every load score back to 0 (bench.soak)",
                    f"{v['errors']} errors; memory {'flat' if v['memory_ok'] else 'grew'}; "
                    f"{len(v['unexpected_keys_without_ttl'])} unexpected keys without a TTL; "
                    f"{len(v['nonzero_scores'])} non-zero scores", ok))
    if engine := side.get("engine"):
        for row in engine["rows"]:
            if row["concurrency"] == 8 and not row.get("torch_threads"):
                out.append((f"transformers engine through the gateway at C = 8: at least {ENGINE_SHARE:.0%} of the "
                            "model's batched decode alone (bench.engine_limit)",
                            f"{row['gateway']['tok_s']:,.0f} of {row['limit']['tok_s']:,.0f} tok/s = "
                            f"{row['share']:.0%}",
                            row["share"] >= ENGINE_SHARE))
    return out


def targets(rows: list[dict], scaled: dict | None, floors: list[dict] | None = None,
            side: dict[str, dict] | None = None) -> list[str]:
    """The issues' targets, each with what this run (and the side benchmarks' last runs) measured, and whether it
    is met."""
    out = ["| target | measured | met? |", "|---|---|---|"]

    def line(target: str, measured: str, ok: bool | None) -> None:
        out.append(f"| {target} | {measured} | {'–' if ok is None else 'yes' if ok else '**no**'} |")

    for t in side_targets(floors, side or {}):
        line(*t)

    redserve = [r for r in rows if r["system"] in GATEWAYS]
    for system in [s for s in GATEWAYS if any(r["system"] == s for r in rows)]:
        name = "redserve" if system == "redserve" else "redserve, 2 gateway processes"
        for w in sorted({r["workers"] for r in rows if r["system"] == system}):
            r, f = _get(rows, system, w, 0.0, 64), _get(rows, "fastchat", w, 0.0, 64)
            if r and f:
                x = r["tokens_per_s"] / f["tokens_per_s"]
                line(f"{name}, delay 0, C = 64, {w} worker(s): tok/s at least 10x FastChat's", f"{x:.1f}x", x >= 10)
            if r := _get(rows, system, w, 0.0, 1):
                line(f"{name}, delay 0, C = 1, {w} worker(s): TTFT p50 at most {TTFT_MS:g} ms",
                     f"{r['ttft_p50_ms']:.2f} ms", r["ttft_p50_ms"] <= TTFT_MS)
            if r := _get(rows, system, w, 20.0, 256):
                line(*_share_target(rows, system, name, w, r))
    if scaled:
        ok = scaled["errors"] == 0 and scaled["requests"] == scaled["streams"] and scaled["gateway_peak_rss_mb"] <= 400
        tokens = scaled.get("max_tokens", 64)
        line(f"{scaled['streams']:,} concurrent streams (delay {scaled['delay_ms']:g} ms, {tokens} tokens) through "
             "one gateway process: 0 errors, RSS at most 400 MB, TTFT p99 stated",
             f"{scaled['errors']} errors, {scaled['requests']:,} complete, gateway peak RSS "
             f"{scaled['gateway_peak_rss_mb']:.0f} MB, TTFT p50 {scaled['ttft_p50_ms']:,.0f} ms, "
             f"p99 {scaled['ttft_p99_ms']:,.0f} ms", ok)
    per_msg = [v for r in redserve if (v := r.get("reply_cmds_per_msg")) is not None and v == v]  # not nan
    if per_msg:
        line("at most one Redis command per streamed message (PUBLISH or EVALSHA per worker reply message)",
             f"{max(per_msg):.3f} at most, {min(per_msg):.3f} at least, over all redserve runs", max(per_msg) <= 1)
    loaded = [r for r in redserve if r["concurrency"] >= 64 and "redis_cmds_per_token" in r]
    if loaded:
        worst = max(r["redis_cmds_per_token"] for r in loaded)
        line("fewer than one Redis command per token under load (C >= 64; every command Redis served, "
             "those inside scripts included)", f"{worst:.3f} at most", worst < 1)
    return out


def per_request(floors: list[dict], rows: list[dict]) -> list[str]:
    """The per-request CPU table, and what it means for the one-gateway target."""
    out = ["| server answering one one-token stream | CPU µs per request | requests/s (C = 64) | errors |",
           "|---|---:|---:|---:|"]
    out += [f"| {f['server']} | {f['cpu_us_per_request']:,} | {f['requests_per_s']:,} | {f['errors']} |"
            for f in floors]
    by = {f["server"]: f["cpu_us_per_request"] for f in floors}
    one, two, d = (_get(rows, s, 1, 20.0, 256) for s in ("redserve", "redserve-2gw", "direct"))
    if not (len(by) == 3 and one and two and d):
        return out
    gw, sse, bare = by["redserve gateway"], by["fastapi + sse-starlette"], by["fastapi"]
    return out + ["", f"A gateway process spends {gw:,} µs of CPU on a request before its tokens flow; FastAPI "
                  f"with sse-starlette answering the same request with nothing behind it spends {sse:,} µs "
                  f"(FastAPI with a plain StreamingResponse: {bare:,} µs). When the 256 streams of a round start "
                  f"together, one process pays that cost request after request: TTFT p50 "
                  f"{one['ttft_p50_ms']:,.0f} ms at delay 20 ms, C = 256 (direct server: {d['ttft_p50_ms']:,.0f} ms), "
                  f"and each of the run's four rounds loses that time. Two gateway processes on the same port take "
                  f"those requests in parallel: TTFT p50 {two['ttft_p50_ms']:,.0f} ms."]


#: Side benchmarks whose last results RESULTS.md includes: name -> (JSON file, module).
SIDE = {"cancel": "cancel.json", "soak": "soak.json", "engine": "engine_limit.json"}


def side_results(directory: Path = BENCH) -> dict[str, dict]:
    """The side benchmarks' last results (bench.cancel, bench.soak, bench.engine_limit), those that were run."""
    return {name: json.loads((directory / file).read_text()) for name, file in SIDE.items()
            if (directory / file).exists()}


def side_sections(side: dict[str, dict]) -> list[str]:
    from bench import cancel, engine_limit, soak

    out: list[str] = []
    if "engine" in side:
        out += ["## The transformers engine against its own limit", "", *engine_limit.render(side["engine"]), ""]
    if "cancel" in side:
        out += [*cancel.render(side["cancel"]), ""]
    if "soak" in side:
        out += ["## Soak", "", *soak.render(side["soak"]), ""]
    return out


def render_md(rows: list[dict], meta: dict, scaled: dict | None = None, floors: list[dict] | None = None,
              side: dict[str, dict] | None = None) -> str:
    delays = sorted({r["delay_ms"] for r in rows})
    conc = sorted({r["concurrency"] for r in rows})
    workers = sorted({r["workers"] for r in rows if r["system"] not in SINGLE}) or [1]
    out = ["# Benchmark results", "",
           "Generated by `python -m bench.matrix` "
           f"({' '.join(meta.get('argv', [])) or 'defaults'}) on {meta.get('date', '?')}, "
           f"{meta.get('machine', '?')}, in {meta.get('elapsed_s', '?')} s. Load generator (aiohttp) on the same "
           f"machine. Synthetic echo engine, T = {meta.get('max_tokens', 64)} tokens per reply, streamed; every "
           "reply checked (complete, echo text, T tokens). The machine is shared and noisy: quote the ratios.", "",
           "Systems: **redserve** (one gateway process + echo workers + Redis), **redserve-2gw** (the same with "
           "`--gateway-processes 2`: two gateway processes accepting on the one port), **direct** "
           "(one SSE server generating the "
           "tokens itself, no relay: the practical upper bound; it has no workers, so its one run is the "
           "reference for both worker counts), **vllm-router 0.1.17** (vLLM's Rust router, `--policy round_robin`, "
           "relaying to one direct server: no workers either, so it too runs once per delay), "
           "**FastChat 0.2.36** (controller + openai_api_server + "
           "synthetic `BaseModelWorker` subclasses, worker concurrency limit 4096). tok/s = completion tokens "
           "delivered per wall second (redserve may pack several tokens into one SSE chunk; FastChat sends "
           "no streamed usage, so its tokens are its content chunks). Because redserve coalesces tokens into "
           "fewer SSE chunks under load while the direct server sends one chunk per token, redserve can exceed "
           "'direct' in tok/s at delay 0; the SSE chunks/s column shows the difference. Server CPU s = "
           "user+system CPU of all serving processes during the run (vllm-router: the router process and the "
           "direct server behind it). Reply cmds/msg = Redis commands that "
           "carried the workers' reply messages (one PUBLISH per gateway per outbox batch) per message; "
           "Redis cmds/token = every command Redis served during the run (INFO commandstats, those inside "
           "Lua scripts included) per completion token.", "",
           "![tokens/s and TTFT p50 against concurrency](results.png)", "",
           "## Targets", "", *targets(rows, scaled, floors, side), "",
           *(["## Per-request cost of a gateway process", "", *per_request(floors, rows), ""] if floors else []),
           *side_sections(side or {}),
           *([(BENCH / "ANALYSIS.md").read_text().rstrip("\n"), ""] if (BENCH / "ANALYSIS.md").exists() else []),
           "## Ratios", "",
           "| delay ms | workers | C | tok/s redserve/FastChat | tok/s redserve/direct | "
           "TTFT p50 FastChat/redserve | TTFT p50 redserve ms | tok/s redserve-2gw/direct | "
           "TTFT p50 redserve-2gw ms | tok/s redserve/vllm-router |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in delays:
        for w in workers:
            for c in conc:
                r, r2, f, x, v = (_get(rows, s, w, d, c)
                                  for s in ("redserve", "redserve-2gw", "fastchat", "direct", "vllm-router"))
                out.append(f"| {d:g} | {w} | {c} | {ratio(r and r['tokens_per_s'], f and f['tokens_per_s'])} | "
                           f"{ratio(r and r['tokens_per_s'], x and x['tokens_per_s'])} | "
                           f"{ratio(f and f['ttft_p50_ms'], r and r['ttft_p50_ms'])} | "
                           f"{fmt(r['ttft_p50_ms']) if r else '–'} | "
                           f"{ratio(r2 and r2['tokens_per_s'], x and x['tokens_per_s'])} | "
                           f"{fmt(r2['ttft_p50_ms']) if r2 else '–'} | "
                           f"{ratio(r['tokens_per_s'] if r else None, v['tokens_per_s'] if v else None)} |")
    out += ["", "## All runs", "",
            "| system | delay ms | workers | C | requests | tok/s | SSE chunks/s | TTFT p50 ms | TTFT p99 ms | "
            "latency p50 ms | latency p99 ms | errors | server CPU s | reply cmds/msg | Redis cmds/token |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {s: i for i, s in enumerate(SYSTEMS)}
    for r in sorted(rows, key=lambda r: (r["delay_ms"], order[r["system"]], r["workers"], r["concurrency"])):
        out.append(f"| {r['system']} | {r['delay_ms']:g} | {r['workers'] if r['system'] not in SINGLE else '–'} | "
                   f"{r['concurrency']} | {r['requests'] + r['errors']} | "
                   + " | ".join(str(r[k]) if k == "errors" else fmt(r.get(k)) for k in FIELDS) + " |")
    errs = [r for r in rows if r.get("first_error")]
    if errs:
        out += ["", "Errors (first per run):", ""]
        out += [f"- {r['system']} w={r['workers']} d={r['delay_ms']:g} C={r['concurrency']}: `{r['first_error']}`"
                for r in errs]
    return "\n".join(out) + "\n"


def render_png(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delays = sorted({r["delay_ms"] for r in rows})
    fig, axes = plt.subplots(len(delays), 2, figsize=(11, 4.2 * len(delays)), squeeze=False)
    colors = {"redserve": "tab:red", "redserve-2gw": "tab:orange", "direct": "tab:green", "vllm-router": "tab:purple",
              "fastchat": "tab:blue"}
    for i, d in enumerate(delays):
        series = sorted({(r["system"], r["workers"]) for r in rows if r["delay_ms"] == d},
                        key=lambda s: (SYSTEMS.index(s[0]), s[1]))
        for system, w in series:
            pts = sorted((r["concurrency"], r["tokens_per_s"], r["ttft_p50_ms"]) for r in rows
                         if (r["system"], r["workers"], r["delay_ms"]) == (system, w, d))
            label = system if system in SINGLE else f"{system} ({w} worker{'s' if w > 1 else ''})"
            style = dict(color=colors[system], marker="o", linestyle="-" if w == 1 else "--", label=label)
            axes[i][0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
            axes[i][1].plot([p[0] for p in pts], [p[2] for p in pts], **style)
        for j, (title, unit) in enumerate([("tokens/s delivered", "tokens/s"), ("TTFT p50", "ms")]):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("concurrency")
            ax.set_ylabel(unit)
            ax.set_title(f"{title}, inter-token delay {d:g} ms")
            ax.grid(True, which="both", alpha=0.3)
        axes[i][0].legend(fontsize=8)
    fig.suptitle("redserve (1 and 2 gateway processes) vs direct vs vllm-router 0.1.17 vs FastChat 0.2.36\n"
                 "(echo engine, T=64; ratios matter, not absolutes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="C = 1, 64; delay 0 only")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--delays", type=float, nargs="+", default=None, help="ms between tokens (default 0 20)")
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=None, help="default 1 16 64 256")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="requests per run = max(rounds x C, min requests)")
    p.add_argument("--min-requests", type=int, default=256, help="at delay 0")
    p.add_argument("--min-requests-delayed", type=int, default=16, help="at a non-zero delay")
    p.add_argument("--streams", type=int, default=5000,
                   help="the scale run: this many concurrent streams through one gateway (0: skip)")
    p.add_argument("--scale-delay", type=float, default=1.0, help="the scale run: seconds between tokens")
    p.add_argument("--json", type=Path, default=BENCH / "results.json")
    p.add_argument("--md", type=Path, default=BENCH / "RESULTS.md")
    p.add_argument("--png", type=Path, default=BENCH / "results.png")
    p.add_argument("--render", action="store_true", help="only re-render from --json")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stacks' processes on the way out
    a.delays = a.delays or ([0.0] if a.quick else [0.0, 20.0])
    a.concurrency = a.concurrency or ([1, 64] if a.quick else [1, 16, 64, 256])

    if a.render:
        data = json.loads(a.json.read_text())
    else:
        if "fastchat" in a.systems:
            fastchat_stack.ensure_venv()
        if "vllm-router" in a.systems:
            vllm_router_stack.ensure_venv()
        t0 = time.perf_counter()
        rows = measure(a)
        scaled = scale(a) if a.streams and "redserve" in a.systems and not a.quick else None
        floors = floor.measure() if "redserve" in a.systems and not a.quick else None
        data = {"meta": {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs",
                         "max_tokens": a.max_tokens, "elapsed_s": round(time.perf_counter() - t0)},
                "rows": rows, "scale": scaled, "floor": floors}
        a.json.write_text(json.dumps(data, indent=1) + "\n")
    a.md.write_text(render_md(data["rows"], data["meta"], data.get("scale"), data.get("floor"), side_results()))
    render_png(data["rows"], a.png)
    print(f"wrote {a.md} and {a.png}", file=sys.stderr)


if __name__ == "__main__":
    main()
