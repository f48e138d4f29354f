"""Serving the gateway app with uvicorn inside an existing event loop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from typing import Iterator

import uvicorn

from broker.settings import Settings
from gateway.app import create_app


class GatewayServer(uvicorn.Server):
    """uvicorn, but SIGINT/SIGTERM end ``serve()`` normally instead of re-raising the signal.

    ``redserve up`` must get control back after the gateway stops, to drain
    its workers and stop its Redis in order; a re-raised signal would kill it
    before its cleanup ran.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, self._stop)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)

    def _stop(self) -> None:
        # A second signal means "now": skip waiting for open connections.
        self.force_exit = self.should_exit
        self.should_exit = True


def gateway_server(settings: Settings, *, log_level: str = "info") -> GatewayServer:
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                            access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    return GatewayServer(config)


async def run_gateway(settings: Settings, *, log_level: str = "info") -> int:
    server = gateway_server(settings, log_level=log_level)
    await server.serve()
    return 0 if server.started else 1
