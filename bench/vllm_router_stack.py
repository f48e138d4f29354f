"""Benchmark vllm-router 0.1.17 (vLLM's Rust router) relaying to the direct server (bench/direct.py).

    python -m bench.vllm_router_stack --delay 0 -c 1 16 64 -n 200 --max-tokens 64

or by hand, with the router installed (see below) and a direct server on port 9000:

    python -m bench.direct --port 9000 --delay 0.02 &
    bench/.venv-vllm-router/bin/vllm-router --worker-urls http://127.0.0.1:9000 --policy round_robin \\
        --host 127.0.0.1 --port 30000 --prometheus-port 29000 --log-level warning
    curl http://127.0.0.1:30000/readiness   # {"status":"ready","healthy_workers":1,"total_workers":1}
    python -m bench.loadgen --url http://127.0.0.1:30000 -c 64 -n 256 --check-echo

vllm-router is installed from PyPI into its own virtualenv, bench/.venv-vllm-router/
(git-ignored), on first use: ``vllm-router==0.1.17``, a manylinux wheel whose
Python launcher (the ``vllm-router`` script) runs the Rust server in its own
process. It has no workers of its own: one router, one direct server behind it,
so the matrix runs it once per delay, and its CPU is the router's plus the
direct server's.

Before routing, the router polls each worker's ``/health`` (hard-wired:
``--health-check-endpoint`` does not change this probe) until it answers
200, every ``--worker-startup-check-interval`` seconds (default 30); then its
own ``/readiness`` answers 200. ``--policy round_robin``: with one worker every
policy picks the same one, and round_robin is the cheapest (the default,
cache_aware, keeps a prefix tree of every prompt). The Prometheus exporter
cannot be turned off, so it gets a free port too. Its startup lines go to
stdout whatever ``--log-level`` says: they are dropped.

The router parses each request and sends it on re-serialized, with SGLang's
sampling defaults added (``ignore_eos``, ``no_stop_trim``, ...) and
``stream_options`` kept; it relays the SSE events as they come, the direct
server's last ``usage`` chunk included, so the load generator counts tokens
from ``usage`` as for redserve (no ``count_chunks``).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from bench import direct
from bench.redserve_stack import Stack, print_runs, run_arguments, stop, wait_ready
from redserve.redis_server import free_port

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv-vllm-router"
PY = VENV / "bin" / "python"
ROUTER = VENV / "bin" / "vllm-router"
REQUIREMENTS = ["vllm-router==0.1.17"]


def ensure_venv() -> Path:
    """Create bench/.venv-vllm-router with vllm-router 0.1.17 unless it is already there."""
    check = [str(PY), "-c", "import vllm_router, vllm_router.router; assert vllm_router.__version__ == '0.1.17'"]
    if ROUTER.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return ROUTER
    print(f"installing {' '.join(REQUIREMENTS)} into {VENV}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True)
    subprocess.run(check, check=True)
    return ROUTER


@contextlib.contextmanager
def vllm_router(delay: float = 0.0, policy: str = "round_robin") -> Iterator[Stack]:
    """The direct server, and vllm-router in front of it: two processes, both counted in ``cpu()``."""
    router = str(ensure_venv())
    with direct.serve(delay) as backend:  # answers /v1/models, so /health too, before the router starts
        port = free_port()
        proc = subprocess.Popen([router, "--worker-urls", backend.url, "--policy", policy,
                                 "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()),
                                 "--worker-startup-check-interval", "1", "--log-level", "warning"],
                                stdout=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(f"{url}/readiness", lambda r: r.status_code == 200 and r.json()["healthy_workers"] == 1)
            yield Stack(url, backend.model, [proc.pid, *backend.pids], proc.pid)
        finally:
            stop([proc])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="round_robin")
    run_arguments(p)
    a = p.parse_args()
    with vllm_router(a.delay, a.policy) as st:
        print_runs(st, {"system": "vllm-router", "policy": a.policy, "delay_ms": a.delay * 1000}, a.concurrency,
                   a.requests, a.max_tokens, check_echo=True)

if __name__ == "__main__":
    main()
