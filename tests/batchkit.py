"""What the batch tests share: a batch runner in process or as a real process, and waiting for a batch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from typing import Any

import httpx
from support import in_background, settings_env, spawn_redserve, sse_events

from broker.batch import BatchClient
from broker.batch_store import TERMINAL
from broker.settings import Settings
from gateway import batch_runner


def running_runner(settings: Settings, **overrides: Any) -> contextlib.AbstractAsyncContextManager[None]:
    """A batch runner in this process (its own gateway app, broker and janitor) until the block ends."""
    settings = settings.model_copy(update=overrides)
    return in_background(batch_runner.serve(settings.redis_url, settings, handle_signals=False))


def spawn_runner(settings: Settings, **overrides: Any) -> subprocess.Popen[bytes]:
    """``python -m redserve batch-runner`` as a real process, for SIGKILL."""
    return spawn_redserve("batch-runner", "--log-level", "warning", env=settings_env(settings, **overrides))


async def wait_batch(client: BatchClient, batch_id: str, timeout: float = 30.0,
                     until: frozenset[str] = TERMINAL) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        batch = await client.batch(batch_id)
        if batch["status"] in until:
            return batch
        if loop.time() > end:
            raise AssertionError(f"batch still {batch['status']} after {timeout}s: {batch['request_counts']}")
        await asyncio.sleep(0.05)


async def time_to_first_token(base_url: str, content: str = "interactive request", max_tokens: int = 2) -> float:
    """Stream one interactive chat request to its end; seconds until its first token."""
    body = {"model": "echo", "messages": [{"role": "user", "content": content}], "stream": True,
            "max_tokens": max_tokens}
    start = time.perf_counter()
    first = None
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for _, data in sse_events(r):
                if first is None and data.startswith("{") and '"content":"' in data and '"content":""' not in data:
                    first = time.perf_counter() - start
    assert first is not None
    return first


def lines(n: int, *, url: str = "/v1/chat/completions", model: str = "echo", prefix: str = "req",
          **params: Any) -> bytes:
    """An input file of ``n`` chat requests whose custom_ids are ``<prefix>-<i>``."""
    rows = [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": url,
             "body": {"model": model, "messages": [{"role": "user", "content": f"{prefix} number {i}"}], **params}}
            for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]
