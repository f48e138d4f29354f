"""Serving the gateway app with uvicorn inside an existing event loop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Iterator

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


def gateway_server(redis_url: str, settings: Settings, *, log_level: str = "info") -> GatewayServer:
    config = uvicorn.Config(create_app(redis_url, settings), host=settings.host, port=settings.port,
                            log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    return GatewayServer(config)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket that several gateway processes can accept on (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def run_gateway(redis_url: str, settings: Settings, *, log_level: str = "info",
                      listen_fd: int | None = None) -> int:
    """One gateway process; on ``listen_fd`` it accepts on a socket inherited from a ``GatewayGroup``."""
    server = gateway_server(redis_url, settings, log_level=log_level)
    sockets = None if listen_fd is None else [socket.socket(fileno=listen_fd)]
    await server.serve(sockets=sockets)
    return 0 if server.started else 1
