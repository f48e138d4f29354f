"""compose.yaml stays runnable: docker-compose validates it, and each service's command and environment
run here as local processes (no Docker engine on these machines) and serve a request."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from openai import OpenAI
from support import shut_down, spawn_redserve, wait_models

from redserve.redis_server import free_port
from workers.tiny_model import build_tiny_model

COMPOSE = Path(__file__).parent.parent / "compose.yaml"


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if not found:
        pytest.fail("docker-compose is not installed: `make test` installs it (Debian package docker-compose)")
    return found


def test_docker_compose_validates_the_file():
    for profile in ([], ["--profile", "hf"]):
        r = subprocess.run([docker_compose(), "-f", str(COMPOSE), *profile, "config"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    config = yaml.safe_load(r.stdout)
    redis = config["services"]["redis"]
    assert "--appendonly" in redis["command"] and "noeviction" in redis["command"]
    assert redis["healthcheck"]["test"][-1] == "ping"
    for name, svc in config["services"].items():
        if name != "redis":
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
            assert svc["environment"]["REDIS_URL"].startswith("redis://redis:"), name


def local_args(command: list[str], replacements: dict[str, str]) -> list[str]:
    """The service's `redserve` arguments for a local process, flag values swapped."""
    assert command[0] == "redserve"
    args = command[1:]
    for i, arg in enumerate(args[:-1]):
        if arg in replacements:
            args[i + 1] = replacements[arg]
    return args


def test_every_service_runs_locally_and_serves(redis_url, tmp_path):
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    port = free_port()
    tiny = build_tiny_model(tmp_path / "tiny")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, svc in services.items():
            if name == "redis":
                continue
            env = {**os.environ, **{k: str(v) for k, v in svc["environment"].items()}, "REDIS_URL": redis_url}
            args = local_args(svc["command"], {"--port": str(port), "--metrics-port": "0", "--host": "127.0.0.1",
                                               "--model-path": str(tiny)})
            for _ in range(svc.get("scale", 1)):
                procs.append(spawn_redserve(*args, env=env))
        base = f"http://127.0.0.1:{port}"
        want = {"echo": services["worker-echo"]["scale"], "tiny": 1}
        deadline = time.monotonic() + 60
        assert wait_models(base, lambda seen: seen == want, interval=0.3, http_timeout=2) == want
        client = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        for model in want:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "compose"}],
                                               max_tokens=4)
            assert r.usage.completion_tokens == 4, model
        # The batch runner service works the OpenAI Batch API through the same workers.
        line = '{"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", ' \
               '"body": {"model": "echo", "messages": [{"role": "user", "content": "batched"}], "max_tokens": 4}}'
        upload = client.files.create(file=("in.jsonl", line.encode()), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline + 60:
            time.sleep(0.2)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 1
    finally:
        codes = [p.returncode for p in shut_down(*procs)]
    assert codes == [0] * len(procs)
