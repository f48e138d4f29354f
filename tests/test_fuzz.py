"""schemathesis fuzzes the gateway from its own OpenAPI schema: no 5xx, no hung request.

Bounded (a fixed number of examples per operation, a per-request timeout)
so it fits in CI; it runs against a real gateway, echo worker and Redis.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path


def schemathesis() -> list[str]:
    exe = Path(sys.executable).parent / "schemathesis"
    return [str(exe)] if exe.exists() else [shutil.which("schemathesis") or "schemathesis"]


async def test_no_server_errors_and_no_hangs(stack, tmp_path):
    await stack.worker(max_concurrency=16)
    gw = await stack.gateway(reply_timeout=5)
    cmd = [*schemathesis(), "run", f"{gw.url}/openapi.json",
           "--checks", "not_a_server_error",
           "--max-examples", "40",
           "--request-timeout", "10",
           "--phases", "examples,coverage,fuzzing",
           "--exclude-path-regex", "^/v1/(batches|files)",  # fuzzed separately by the batch tests' own checks
           "--seed", "1"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "PYTHONPATH": str(Path(__file__).parent)}
    proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=600,
                                   cwd=tmp_path, env=env)
    report = proc.stdout + proc.stderr
    (Path("test-artifacts") / "schemathesis.txt").parent.mkdir(exist_ok=True)
    (Path("test-artifacts") / "schemathesis.txt").write_text(report)
    assert proc.returncode == 0, report[-4000:]
    assert " passed" in report and "failed" not in report.split("SUMMARY")[-1].lower(), report[-4000:]
    assert "Timeout" not in report and "timed out" not in report.lower(), report[-4000:]
