"""schemathesis fuzzes the gateway from its own OpenAPI schema: no 5xx, no hung request, and, with two API
keys, no response to one key that carries the other's data.

Bounded (a fixed number of examples per operation, a per-request timeout)
so it fits in CI; it runs against a real gateway, echo worker and Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import openai
from batchkit import lines, running_runner
from support import sse_events


def schemathesis() -> list[str]:
    exe = Path(sys.executable).parent / "schemathesis"
    return [str(exe)] if exe.exists() else [shutil.which("schemathesis") or "schemathesis"]


async def fuzz(url: str, tmp_path: Path, name: str, *options: str, env: dict[str, str] | None = None) -> str:
    """Run schemathesis against ``url`` (checks ``not_a_server_error`` plus ``options``); its report, passed."""
    cmd = [*schemathesis(), "run", f"{url}/openapi.json", "--request-timeout", "10",
           "--phases", "examples,coverage,fuzzing", "--seed", "1", *options]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=600,
                                   cwd=tmp_path, env=env)
    report = proc.stdout + proc.stderr
    (Path("test-artifacts") / f"{name}.txt").parent.mkdir(exist_ok=True)
    (Path("test-artifacts") / f"{name}.txt").write_text(report)
    assert proc.returncode == 0, report[-4000:]
    assert " passed" in report and "failed" not in report.split("SUMMARY")[-1].lower(), report[-4000:]
    assert "Timeout" not in report and "timed out" not in report.lower(), report[-4000:]
    return report


async def test_no_server_errors_and_no_hangs(stack, tmp_path):
    await stack.worker(["echo", "echo-2"], max_concurrency=16)  # two models: the arena can draw a battle
    gw = await stack.gateway(reply_timeout=5)
    await fuzz(gw.url, tmp_path, "schemathesis", "--checks", "not_a_server_error", "--max-examples", "40",
               "--exclude-path-regex", "^/v1/(batches|files)")  # fuzzed below, as another tenant


async def test_another_tenant_never_sees_a_tenants_data(stack, settings, tmp_path):
    """keyA owns a file, a finished batch with its output and a resumable stream, each holding a secret;
    schemathesis then fuzzes every route as keyB, often with keyA's ids in the path."""
    key_a, key_b = "sk-fuzz-a", "sk-fuzz-b"
    marker = f"SECRET-{uuid.uuid4().hex}"
    await stack.worker(["echo", "echo-2"], max_concurrency=16)  # two models: the arena can draw a battle
    gw = await stack.gateway(reply_timeout=5, api_keys=[key_a, key_b])
    a = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key_a, max_retries=0)
    async with running_runner(settings):
        uploaded = await a.files.create(file=("a.jsonl", lines(2, max_tokens=4, prefix=marker)), purpose="batch")
        batch = await a.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
        while batch.status != "completed":
            await asyncio.sleep(0.05)
            batch = await a.batches.retrieve(batch.id)
    body = {"model": "echo", "messages": [{"role": "user", "content": marker}], "stream": True,
            "stream_options": {"resumable": True}}
    async with httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {key_a}"}) as http:
        stream = await http.post("/v1/chat/completions", json=body)
    response_id = json.loads([data async for _, data in sse_events(stream)][0])["id"]
    foreign = {"marker": marker, "files": [uploaded.id, batch.output_file_id], "batches": [batch.id],
               "responses": [response_id]}
    secrets = tmp_path / "foreign.json"
    secrets.write_text(json.dumps(foreign))
    await fuzz(gw.url, tmp_path, "schemathesis-tenants", "--checks", "not_a_server_error,no_foreign_data",
                        "--max-examples", "25", "--header", f"Authorization: Bearer {key_b}",
                        env={"REDSERVE_FUZZ_FOREIGN": str(secrets)})
    # keyA's things are all still there for keyA: the fuzzing as keyB changed nothing of theirs.
    assert (await a.batches.retrieve(batch.id)).status == "completed"
    assert marker.encode() in (await a.files.content(batch.output_file_id)).content
