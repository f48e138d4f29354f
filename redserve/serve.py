"""Serving the gateway app with uvicorn inside an existing event loop."""

from __future__ import annotations

import uvicorn

from broker.settings import Settings
from gateway.app import create_app


def gateway_server(settings: Settings, *, log_level: str = "info") -> uvicorn.Server:
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                            access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


async def run_gateway(settings: Settings, *, log_level: str = "info") -> int:
    server = gateway_server(settings, log_level=log_level)
    await server.serve()
    return 0 if server.started else 1
