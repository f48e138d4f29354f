"""Benchmark FastChat 0.2.36: its controller, its openai_api_server and N synthetic echo workers.

    python -m bench.fastchat_stack --workers 1 --delay 0 -c 1 16 64 -n 200 --max-tokens 64

FastChat is installed from PyPI into its own virtualenv, bench/.venv-fastchat/
(git-ignored), on first use: ``fschat==0.2.36`` with ``pydantic<2`` and
``fastapi<0.110`` (0.2.36's API server calls pydantic-1-only ``.json(ensure_ascii=...)``
and the newest fastapi needs pydantic 2). No torch: the echo worker
(bench/fastchat_echo_worker.py) never imports FastChat's model code.

FastChat streams no ``usage`` (it ignores ``stream_options``), so the load
generator counts content chunks as tokens here (``count_chunks``), and checks
the text is the echo engine's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.redserve_stack import Stack, print_runs, run_arguments, stop, wait_ready
from redserve.redis_server import free_port

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv-fastchat"
PY = VENV / "bin" / "python"
REQUIREMENTS = ["fschat==0.2.36", "pydantic<2", "fastapi<0.110"]


def ensure_venv() -> Path:
    """Create bench/.venv-fastchat with FastChat 0.2.36 unless it is already there."""
    check = [str(PY), "-c", "import fastchat, fastchat.serve.openai_api_server, pydantic; "
             "assert fastchat.__version__ == '0.2.36' and pydantic.VERSION.startswith('1.')"]
    # importing its api server opens a log file in LOGDIR (default: the cwd): keep it out of the checkout
    check_env = os.environ | {"LOGDIR": tempfile.gettempdir()}
    if PY.exists() and subprocess.run(check, capture_output=True, env=check_env).returncode == 0:
        return PY
    print(f"installing {' '.join(REQUIREMENTS)} into {VENV}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True)
    subprocess.run(check, check=True, env=check_env)
    return PY


@contextlib.contextmanager
def fastchat(workers: int = 1, delay: float = 0.0, model: str = "echo") -> Iterator[Stack]:
    """FastChat's controller + openai_api_server + ``workers`` echo workers, as separate processes."""
    py = str(ensure_venv())
    with tempfile.TemporaryDirectory(prefix="fastchat-bench-") as logdir:
        env = os.environ | {"LOGDIR": logdir, "PYTHONUNBUFFERED": "1"}
        out = open(os.path.join(logdir, "stdout.log"), "wb")  # FastChat logs every request at INFO
        cport, aport = free_port(), free_port()
        controller = f"http://127.0.0.1:{cport}"
        spawn = lambda *args: subprocess.Popen([py, *args], env=env, stdout=out, stderr=subprocess.STDOUT,  # noqa: E731
                                               cwd=logdir)  # its api server writes a log file into the cwd
        procs = [spawn("-m", "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(cport))]
        try:
            wait_ready(f"{controller}/docs", lambda r: r.status_code == 200)
            for _ in range(workers):
                procs.append(spawn(str(BENCH / "fastchat_echo_worker.py"), "--controller-address", controller,
                                   "--port", str(free_port()), "--model-name", model, "--delay", str(delay)))
            procs.append(spawn("-m", "fastchat.serve.openai_api_server", "--controller-address", controller,
                               "--host", "127.0.0.1", "--port", str(aport)))
            for _ in range(600):  # every worker registered (the controller sums their speeds, 1 each)
                try:
                    if httpx.post(f"{controller}/worker_get_status", timeout=2).json()["speed"] == workers:
                        break
                except Exception:
                    pass
                time.sleep(0.1)
            url = f"http://127.0.0.1:{aport}"
            wait_ready(f"{url}/v1/models", lambda r: any(m["id"] == model for m in r.json()["data"]))
            yield Stack(url, model, [pr.pid for pr in procs], procs[-1].pid)
        finally:
            stop(procs)
            out.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1)
    run_arguments(p)
    a = p.parse_args()
    with fastchat(a.workers, a.delay) as st:
        print_runs(st, {"system": "fastchat", "workers": a.workers, "delay_ms": a.delay * 1000}, a.concurrency,
                   a.requests, a.max_tokens, check_echo=True, count_chunks=True)

if __name__ == "__main__":
    main()
