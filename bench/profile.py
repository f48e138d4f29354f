"""Profile redserve's gateway and a worker under load with py-spy, and print where their time goes.

    python -m bench.profile                      # delay 20 ms, C = 256, 1,024 requests
    python -m bench.profile --delay 0 -c 64 -n 512 --top 30

Starts the benchmark stack (bench.redserve_stack), warms it up, then samples
the gateway and the first worker with ``py-spy record`` while the load
generator runs. For each process it prints the frames with the most samples
of their own ("self") and the files that hold the most self time, and keeps
the raw stacks (``--out``, py-spy's collapsed format: feed them to any
flame-graph tool). Needs py-spy (``pip install -e '.[bench]'``) and the
right to ptrace the stack's processes (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.loadgen import run
from bench.redserve_stack import redserve


def collapse(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    """Samples in all, self samples per frame, self samples per source file (py-spy's raw format)."""
    frames: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        leaf = stack.rsplit(";", 1)[-1]
        frames[leaf] += n
        m = re.search(r"\(([^:)]+)", leaf)
        source = re.sub(r".*(site-packages|lib/python3\.\d+)/", "", m.group(1)) if m else leaf
        files["/".join(source.split("/")[:2])] += n
    return total, frames, files


def report(name: str, path: Path, top: int) -> None:
    total, frames, files = collapse(path)
    print(f"\n== {name}: {total} samples ({path})")
    if not total:
        return
    print("-- self time by frame")
    for frame, n in frames.most_common(top):
        print(f"{n / total:6.1%}  {frame}")
    print("-- self time by file")
    for source, n in files.most_common(top // 2):
        print(f"{n / total:6.1%}  {source}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--delay", type=float, default=0.02, help="seconds between echo tokens")
    p.add_argument("-c", "--concurrency", type=int, default=256)
    p.add_argument("-n", "--requests", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seconds", type=int, default=6, help="how long py-spy samples (keep it under the run)")
    p.add_argument("--rate", type=int, default=200, help="samples per second")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("bench/profiles"))
    a = p.parse_args()
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))  # venv unactivated
    if spy is None:
        raise SystemExit("py-spy not found: pip install -e '.[bench]'")
    a.out.mkdir(parents=True, exist_ok=True)
    with redserve(a.workers, a.delay, a.max_tokens) as st:
        asyncio.run(run(st.url, st.model, 4, 8, a.max_tokens))  # warm-up
        targets = {"gateway": st.main_pid, "worker": st.pids[0]}
        spies = {name: (a.out / f"{name}.txt", subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(a.seconds), "--rate", str(a.rate),
             "--format", "raw", "--nonblocking", "--output", str(a.out / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)) for name, pid in targets.items()}
        res = asyncio.run(run(st.url, st.model, a.concurrency, a.requests, a.max_tokens))
        for _, proc in spies.values():
            proc.wait()
    s = res.summary()
    print(f"load: {s['tokens_per_s']:,.0f} tok/s, TTFT p50 {s['ttft_p50_ms']:.1f} ms, {s['errors']:.0f} errors "
          f"(sampling slows the processes it samples)")
    for name, (path, _) in spies.items():
        report(name, path, a.top)


if __name__ == "__main__":
    main()
