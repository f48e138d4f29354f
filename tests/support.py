"""Helpers tests import (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from openai import AsyncOpenAI

from broker.settings import Settings
from redserve.serve import gateway_server
from workers.base import BaseModelWorker
from workers.echo import EchoWorker


async def serving(server: Any) -> tuple[asyncio.Task[None], int]:
    """Start a uvicorn ``server`` (bound to port 0) in this loop; its task and the port it got, once it listens."""
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return task, server.servers[0].sockets[0].getsockname()[1]


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):  # noqa: ANN001, ANN201
    """Poll an async or sync predicate until it returns something truthy."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    """(id, data) of each SSE event as its data line arrives: the tests' one reader of the gateway's streams."""
    event_id = None
    async for line in response.aiter_lines():
        if line.startswith("id:"):
            event_id = line[3:].removeprefix(" ")
        elif line.startswith("data:"):
            yield event_id, line[5:].removeprefix(" ")
            event_id = None


def settings_env(settings: Settings, **overrides: object) -> dict[str, str]:
    """Our environment plus ``settings`` as variables: how a redserve process started by a test gets them."""
    return os.environ | settings.model_copy(update=overrides).to_env()


def redserve_argv(*args: str) -> list[str]:
    """``python -m redserve ARGS`` with this interpreter, so the process runs this checkout."""
    return [sys.executable, "-m", "redserve", *args]


def spawn_redserve(*args: str, env: Mapping[str, str] | None = None, **popen: Any) -> subprocess.Popen[Any]:
    """``redserve ARGS`` as a real process, for what only a process has: signals, kills, its own event loop."""
    return subprocess.Popen(redserve_argv(*args), env=env, **popen)


def run_redserve(*args: str, env: Mapping[str, str] | None = None,
                 timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``redserve ARGS`` run to its end, output captured as text: a command a user types and reads."""
    return subprocess.run(redserve_argv(*args), capture_output=True, text=True, timeout=timeout, env=env)


def wait_models(base_url: str, ready: Callable[[dict[str, int]], bool], *, interval: float = 0.2,
                http_timeout: float = 1, watch: subprocess.Popen[Any] | None = None,
                timeout: float = 60) -> dict[str, int]:
    """Poll /v1/models until ``ready({model: workers})`` or ``watch`` exits: processes are up once it lists them."""
    deadline = time.monotonic() + timeout
    seen: dict[str, int] = {}
    while time.monotonic() < deadline and (watch is None or watch.poll() is None):
        try:
            data = httpx.get(f"{base_url}/v1/models", timeout=http_timeout).json()["data"]
            seen = {m["id"]: m["workers"] for m in data}
        except (httpx.HTTPError, KeyError):
            pass
        if ready(seen):
            break
        time.sleep(interval)
    return seen


def kill(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL and reap: the process dies as in a crash, and leaves no zombie behind."""
    proc.kill()
    proc.wait()


def shut_down(*procs: subprocess.Popen[Any], sig: int = signal.SIGTERM,
              timeout: float = 30) -> list[subprocess.CompletedProcess[Any]]:
    """Signal every process, then reap each with its output: their exit codes say whether they stopped cleanly."""
    for p in procs:
        p.send_signal(sig)
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


@dataclass
class Gateway:
    url: str
    server: object
    task: asyncio.Task[None]

    def client(self, **kw: object) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key="test", max_retries=0, **kw)  # type: ignore[arg-type]


@dataclass
class Stack:
    """Starts pieces of a redserve deployment and stops them all at the end of a test."""

    settings: Settings
    gateways: list[Gateway] = field(default_factory=list)
    workers: list[tuple[BaseModelWorker, asyncio.Task[None]]] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    async def gateway(self, **overrides: object) -> Gateway:
        s = self.settings.model_copy(update={"port": 0, **overrides})
        server = gateway_server(s.redis_url, s, log_level="warning")
        task, port = await serving(server)
        gw = Gateway(f"http://127.0.0.1:{port}", server, task)
        self.gateways.append(gw)
        return gw

    async def worker(self, models: list[str] | None = None, *, cls: type[BaseModelWorker] = EchoWorker,
                     worker_id: str | None = None, **overrides: object) -> BaseModelWorker:
        s = self.settings.model_copy(update=overrides)
        w = cls(s.redis_url, s, models or ["echo"], worker_id=worker_id)
        task = asyncio.create_task(w.serve())
        waiter = asyncio.create_task(w.wait_registered())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        self.workers.append((w, task))
        return w

    def spawn_worker(self, worker_id: str, models: list[str] | None = None,
                     **overrides: object) -> subprocess.Popen[bytes]:
        """A real worker process, for signals and kills."""
        args = ["worker", "--log-level", "warning", "--engine", "echo", "--worker-id", worker_id]
        for m in models or ["echo"]:
            args += ["--model", m]
        proc = spawn_redserve(*args, env=settings_env(self.settings, **overrides))
        self.procs.append(proc)
        return proc

    async def close(self) -> None:
        for w, _ in self.workers:
            w.drain()
        for _, task in self.workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        for gw in self.gateways:
            gw.server.should_exit = True  # type: ignore[attr-defined]
        for gw in self.gateways:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(gw.task, 10)
        for p in self.procs:
            kill(p)


@contextlib.asynccontextmanager
async def in_background(work: Awaitable[object]) -> AsyncIterator[None]:
    """Keep ``work`` (a long request, a server) running during the block, then cancel it."""
    task = asyncio.ensure_future(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
