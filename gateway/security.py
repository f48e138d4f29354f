"""Who is asking, how much they may ask, and how much they may send: API keys, limits and the body cap.

The key is checked from the headers before a byte of the body is read: an
unauthenticated request gets its 401 at once and its connection closed.
A body is counted while it is read and refused (413) the moment it passes
its cap, so nothing past the cap is ever buffered. Each key (tenant) may
have a bounded number of requests in flight on one gateway. Requests per
minute are counted before the body is read; tokens per minute are reserved
once the request is validated (``RateLimiter.reserve``) and settled when it
ends. All of it costs nothing when not configured.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from redis.exceptions import RedisError
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.client import BrokerClient
from broker.errors import ServeError
from broker.settings import Settings
from broker.tenants import ANONYMOUS, PUBLIC, Tenant, tenant_id
from gateway.errors import APIError, BodyTooLarge, redis_error, response

log = logging.getLogger(__name__)

#: Where the tenant of a request lives in its ASGI scope. An in-process caller (the batch runner) may set it
#: before calling the app, to act as a batch's owner; no ASGI server ever sets it from the network.
TENANT = "redserve.tenant"
#: Paths behind the API key. Everything else is the web UI's static files, which hold no data.
PROTECTED = ("/v1/", "/api/", "/tokenize", "/metrics", "/health", "/docs", "/redoc", "/openapi.json")
#: Paths that need an admin key once admin keys are configured (operators' data).
ADMIN_ONLY = ("/metrics",)
_WINDOW_MS = 120_000


def load_keys(settings: Settings) -> dict[bytes, Tenant]:
    """Every accepted key and the tenant it stands for."""
    keys = list(settings.api_keys)
    if settings.api_keys_file:
        keys += [line.strip() for line in Path(settings.api_keys_file).read_text().splitlines() if line.strip()]
    tenants = {k.encode(): Tenant(tenant_id(k.encode())) for k in keys}
    tenants.update({k.encode(): Tenant(tenant_id(k.encode()), admin=True) for k in settings.admin_api_keys})
    return tenants


def tenant_of(conn: HTTPConnection) -> Tenant:
    """The tenant the API-key middleware found for this request (none found: one that sees nothing)."""
    return conn.scope.get(TENANT, PUBLIC)


@dataclass(slots=True)
class Reservation:
    """Tokens held against a tenant's per-minute budget until the request's true usage is known."""

    key: str
    tokens: int


class RateLimiter:
    """Requests and tokens per tenant per clock minute, counted atomically in Redis (exact across gateways)."""

    def __init__(self, broker: BrokerClient, rpm: int, tpm: int) -> None:
        self.broker = broker
        self.rpm = rpm
        self.tpm = tpm

    async def admit(self, tenant: Tenant) -> float | None:
        """Count one request; None if admitted, else the seconds until the next window."""
        if not self.rpm or not tenant.limited:
            return None
        now = time.time()
        key = self.broker.keys.rate(tenant.id, int(now // 60), "requests")
        ok = await self.broker.charge(key, self.rpm, 1, _WINDOW_MS)
        return None if ok else 60 - (now % 60)

    async def reserve(self, tenant: Tenant, tokens: int) -> Reservation | None:
        """Hold ``tokens`` of this minute's budget, or raise a 429 when the budget is spent.

        A request is admitted while the tenant's tokens (reserved or used)
        are under the limit, so concurrent requests overshoot by at most one
        reservation. None when no token limit applies.
        """
        if not self.tpm or not tenant.limited:
            return None
        now = time.time()
        key = self.broker.keys.rate(tenant.id, int(now // 60), "tokens")
        if not await self.broker.charge(key, self.tpm, tokens, _WINDOW_MS):
            raise APIError(429, f"Rate limit reached for this API key: {self.tpm} tokens per minute (tpm_limit).",
                           code="rate_limit_exceeded", headers={"Retry-After": str(max(1, int(61 - now % 60)))})
        return Reservation(key, tokens)

    async def settle(self, held: Reservation | None, used: int) -> None:
        """Replace a reservation by the tokens really used (0 for a request that produced nothing).

        Best effort: with Redis away the reservation stays charged, which errs on the tenant's side of the limit.
        """
        if held is not None and used != held.tokens:
            try:
                with anyio.CancelScope(shield=True):  # also while a disconnected client's task is cancelled
                    await self.broker.charge(held.key, 0, used - held.tokens, _WINDOW_MS)
            except RedisError as exc:
                log.warning("could not settle a token reservation (%s); it stays charged", exc)


class APIKeyMiddleware:
    """Every protected path needs ``Authorization: Bearer <key>``; keys compare in constant time.

    Runs before anything reads the body. Also caps each tenant's requests in
    flight on this gateway (slow bodies and slow readers hold a slot) and
    counts requests per minute.
    """

    def __init__(self, app: ASGIApp, keys: dict[bytes, Tenant], settings: Settings, limiter: RateLimiter) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = set(settings.open_paths)
        self.admins = any(t.admin for t in keys.values())
        self.limiter = limiter
        self.max_in_flight = settings.max_in_flight_per_key
        self.in_flight: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or TENANT in scope:  # set by a trusted in-process caller
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if not self.keys or not path.startswith(PROTECTED):  # no keys at all, or the UI's static files
            scope[TENANT] = PUBLIC if self.keys else ANONYMOUS
            await self.app(scope, receive, send)
            return
        tenant = self._authenticate(scope)
        if tenant is None and path in self.open_paths:
            tenant = PUBLIC  # an opened route: a key is optional, and without one the caller owns nothing
        if tenant is None:
            message = "Missing API key: send 'Authorization: Bearer <key>'." if not _bearer(scope) \
                else "Incorrect API key provided."
            await reply(scope, receive, send, APIError(401, message, code="invalid_api_key"), close=True)
            return
        if self.admins and not tenant.admin and path.startswith(ADMIN_ONLY) and path not in self.open_paths:
            refusal = APIError(403, "This route needs an admin key (admin_api_keys).", code="admin_only")
            await reply(scope, receive, send, refusal, close=True)
            return
        if self.max_in_flight and self.in_flight[tenant.id] >= self.max_in_flight:
            await reply(scope, receive, send, APIError(
                429, f"This API key has {self.max_in_flight} requests in flight on this gateway "
                     "(max_in_flight_per_key); wait for one to end.", code="too_many_in_flight"), close=True)
            return
        scope[TENANT] = tenant
        self.in_flight[tenant.id] += 1
        try:
            if scope["method"] == "POST" and not await self._admitted(scope, receive, send, tenant):
                return
            await self.app(scope, receive, send)
        finally:
            self.in_flight[tenant.id] -= 1
            if not self.in_flight[tenant.id]:
                del self.in_flight[tenant.id]

    def _authenticate(self, scope: Scope) -> Tenant | None:
        presented = _bearer(scope)
        found = None
        for key, tenant in self.keys.items():  # no early exit: timing tells nothing about which key nearly matched
            if hmac.compare_digest(presented, key):
                found = tenant
        return found

    async def _admitted(self, scope: Scope, receive: Receive, send: Send, tenant: Tenant) -> bool:
        try:
            wait = await self.limiter.admit(tenant)
        except RedisError as exc:
            await reply(scope, receive, send, redis_error(exc))
            return False
        if wait is None:
            return True
        refusal = APIError(429, f"Rate limit reached for this API key: {self.limiter.rpm} requests per minute "
                                "(rpm_limit).", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        await reply(scope, receive, send, refusal)
        return False


class BodyLimitMiddleware:
    """Refuse bodies over the cap: by Content-Length up front, a chunked body as soon as it passes the cap.

    Nothing is buffered here: the app reads the body through a counting
    ``receive``, so memory per request is bounded by the cap, never by what a
    client keeps sending.
    """

    def __init__(self, app: ASGIApp, cap: Callable[[str], tuple[int, str]]) -> None:
        """``cap(path)``: the byte limit of a path and the setting that sets it."""
        self.app = app
        self.cap = cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.cap(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await reply(scope, receive, send, BodyTooLarge(limit, setting).api_error())
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        await self.app(scope, counted, send)


def _bearer(scope: Scope) -> bytes:
    header = dict(scope["headers"]).get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


async def reply(scope: Scope, receive: Receive, send: Send, exc: ServeError, *, close: bool = False) -> None:
    """Answer an error from middleware, rendered as every error is (``gateway.errors.response``)."""
    await response(exc, close=close)(scope, receive, send)
