"""``redserve up``: the whole system on one machine, for trying it and for demos.

A private Redis (unless REDIS_URL is set), N worker processes, a batch runner
and a gateway in this process. Ctrl-C drains the workers, then stops Redis.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

from broker.settings import Settings
from redserve import loop
from redserve.gateways import spawn_gateway
from redserve.redis_server import RedisServer
from redserve.serve import gateway_server, listen


def run_stack(settings: Settings, *, workers: int, engine: str, models: list[tuple[str, str | None]],
              log_level: str = "info", batch_runner: bool = True) -> int:
    """``models``: (served name, model directory or None) pairs, each served by ``workers`` processes."""
    redis: RedisServer | None = None
    if not settings.redis_url:
        redis = RedisServer().start()
        settings = settings.model_copy(update={"redis_url": redis.url})
    env = os.environ | settings.to_env()
    worker = [sys.executable, "-m", "redserve", "worker", "--log-level", log_level, "--engine", engine]
    commands = [[*worker, "--model", name, *(["--model-path", path] if path else [])] for name, path in models]
    # Own sessions: a terminal's Ctrl-C reaches only this process, which then
    # stops things in order (gateway, then draining workers, then Redis).
    procs = [subprocess.Popen(cmd, env=env, start_new_session=True) for cmd in commands for _ in range(workers)]
    if batch_runner:  # so /v1/batches and `redserve batch submit` work out of the box
        runner = [sys.executable, "-m", "redserve", "batch-runner", "--log-level", log_level]
        procs.append(subprocess.Popen(runner, env=env, start_new_session=True))
    sock = listen(settings.host, settings.port) if settings.gateway_processes > 1 else None
    if sock is not None:  # the other gateways accept on the socket this process serves on too
        procs += [spawn_gateway(settings, log_level, sock.fileno()) for _ in range(settings.gateway_processes - 1)]
    try:
        return loop.run(_serve(settings, [name for name, _ in models], redis, log_level, sock), settings.event_loop)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(settings.drain_timeout + 5)
            except subprocess.TimeoutExpired:
                p.kill()
        if redis:
            redis.close()


async def _serve(settings: Settings, models: list[str], redis: RedisServer | None, log_level: str,
                 sock: socket.socket | None) -> int:
    server = gateway_server(settings.resolved_redis_url(), settings, log_level=log_level)
    task = asyncio.create_task(server.serve(sockets=None if sock is None else [sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        base = f"http://{settings.host}:{server.servers[0].sockets[0].getsockname()[1]}"
        where = f"private Redis at {redis.url} (data in {redis.dir})" if redis else f"Redis at {settings.redis_url}"
        model = models[0]
        arena = f"  arena          {base}/#arena   (an anonymous battle of two models)\n" if len(models) > 1 else ""
        print(
            f"\nredserve is up: {base}\n"
            f"  web UI         {base}/\n"
            f"  OpenAI API     {base}/v1   (model{'s' if len(models) > 1 else ''}: {', '.join(models)})\n"
            f"{arena}"
            f"  {where}\n"
            f"  try: curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hello there\"}}]}}'\n"
            f"  Ctrl-C stops everything.\n",
            flush=True,
        )
    await task
    return 0 if server.started else 1
