"""The gateway application factory: OpenAI API + UI over one BrokerClient per process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from broker import __version__
from broker.client import BrokerClient
from broker.connection import connect
from broker.settings import Settings
from gateway import batches, console, errors, resume
from gateway.arena import routes as arena
from gateway.conversations import ConversationLog
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from gateway.moderation import Moderator
from gateway.routes import router
from gateway.security import APIKeyMiddleware, BodyLimitMiddleware, RateLimiter, load_keys

#: Room for the multipart envelope (boundaries, part headers) around an uploaded file of the largest size.
UPLOAD_ENVELOPE = 64 * 1024


def create_app(redis_url: str, settings: Settings, *, batch: bool = False) -> FastAPI:
    """Build a gateway. Its Redis connections open in the lifespan, not at import.

    ``batch``: the batch runner's in-process gateway, whose jobs go only into batch room.
    """

    broker = BrokerClient(redis_url, settings, batch=batch)
    limiter = RateLimiter(broker, settings.rpm_limit, settings.tpm_limit)

    moderator = Moderator.from_settings(settings.moderation_rules, settings.moderation_url,
                                        settings.moderation_api_key) if settings.moderation else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broker.start()
        log_redis = connect(redis_url, decode=True) if settings.log_conversations else None
        if log_redis is not None:
            app.state.conversations = ConversationLog(log_redis, broker.keys.conversations(),
                                                      settings.conversations_max_entries, metrics.log_misses)
        try:
            yield
        finally:
            if log_redis is not None:
                await app.state.conversations.close()
                await log_redis.aclose()
            if moderator is not None:
                await moderator.aclose()
            await broker.close()

    docs = settings.api_docs
    app = FastAPI(title="redserve", version=__version__, lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.settings = settings
    app.state.redis_url = redis_url
    app.state.broker = broker
    app.state.limiter = limiter
    app.state.metrics = metrics = GatewayMetrics(broker)
    app.state.moderator = moderator
    app.state.conversations = None
    errors.install(app)
    # The last added runs first: metrics see every answer, then the API key (before any body is read),
    # then the body cap.
    app.add_middleware(BodyLimitMiddleware, cap=lambda path: body_cap(settings, path))
    app.add_middleware(APIKeyMiddleware, keys=load_keys(settings), settings=settings, limiter=limiter)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:  # outermost: a browser's preflight is answered before any key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Retry-After"])
    # The API's own routes go straight into the app's table: FastAPI 0.16x keeps an included router wrapped and
    # walks the wrapper (and its route-version bookkeeping) on every request, about 20 µs of a streamed request's
    # CPU. These routers have no prefix, dependencies or lifespan for include_router to merge.
    app.router.routes.extend(_flat_routes(router, resume.router))
    app.include_router(console.router)
    app.include_router(batches.router)
    app.include_router(arena.router)
    ui_dir = resources.files("ui")
    app.mount("/", StaticFiles(directory=str(ui_dir), html=True), name="ui")
    return app


def body_cap(settings: Settings, path: str) -> tuple[int, str]:
    """The largest body a path takes, and the setting that says so: file uploads have their own."""
    if path == "/v1/files":
        return settings.batch_max_file_bytes + UPLOAD_ENVELOPE, "batch_max_file_bytes"
    return settings.max_body_bytes, "max_body_bytes"


def _flat_routes(*routers: APIRouter) -> list[BaseRoute]:
    """The routes of routers that include_router would add nothing to (no prefix, dependencies or lifespan)."""
    for r in routers:
        if r.prefix or r.dependencies or r.tags:
            raise ValueError(f"router {r!r} has a prefix, dependencies or tags: include it with include_router")
    return [route for r in routers for route in r.routes]
