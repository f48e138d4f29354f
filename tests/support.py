"""Helpers tests import (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from openai import AsyncOpenAI

from broker.settings import Settings
from redserve.serve import gateway_server
from workers.base import BaseModelWorker
from workers.echo import EchoWorker


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
        server = gateway_server(s, log_level="warning")
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        gw = Gateway(f"http://127.0.0.1:{port}", server, task)
        self.gateways.append(gw)
        return gw

    async def worker(self, models: list[str] | None = None, *, cls: type[BaseModelWorker] = EchoWorker,
                     worker_id: str | None = None, **overrides: object) -> BaseModelWorker:
        s = self.settings.model_copy(update=overrides)
        w = cls(s, models or ["echo"], worker_id=worker_id)
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
        s = self.settings.model_copy(update=overrides)
        cmd = [sys.executable, "-m", "redserve", "worker", "--log-level", "warning", "--engine", "echo",
               "--worker-id", worker_id]
        for m in models or ["echo"]:
            cmd += ["--model", m]
        proc = subprocess.Popen(cmd, env=os.environ | s.to_env())
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
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()


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
