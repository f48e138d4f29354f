"""The gateway application factory: OpenAI API + UI over one BrokerClient per process."""

from __future__ import annotations

import contextlib
from importlib import resources
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from broker import __version__
from broker.client import BrokerClient
from broker.settings import Settings
from gateway import batches, console, errors, resume
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from gateway.routes import router
from gateway.security import APIKeyMiddleware, BodyLimitMiddleware, RateLimiter, load_keys


def create_app(settings: Settings) -> FastAPI:
    """Build a gateway. Its Redis connections open in the lifespan, not at import."""

    broker = BrokerClient(settings)
    limiter = RateLimiter(broker, settings.rpm_limit, settings.tpm_limit)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broker.start()
        try:
            yield
        finally:
            await broker.close()

    app = FastAPI(title="redserve", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.broker = broker
    app.state.limiter = limiter
    app.state.metrics = metrics = GatewayMetrics(broker)
    errors.install(app)
    # The last added runs first: metrics see every answer, then the body cap, then the API key.
    app.add_middleware(APIKeyMiddleware, keys=load_keys(settings), open_paths=settings.open_paths, limiter=limiter)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, exempt=("/v1/files",))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(router)
    app.include_router(resume.router)
    app.include_router(console.router)
    app.include_router(batches.router)
    ui_dir = resources.files("ui")
    app.mount("/", StaticFiles(directory=str(ui_dir), html=True), name="ui")
    return app
