"""API keys, per-key rate limits shared by every gateway, and the request body size cap.

Both checks are plain ASGI middleware: they answer before FastAPI parses a
body, and cost nothing when not configured.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.client import BrokerClient
from broker.settings import Settings
from gateway.errors import error_body


def load_keys(settings: Settings) -> list[bytes]:
    keys = list(settings.api_keys)
    if settings.api_keys_file:
        keys += [line.strip() for line in Path(settings.api_keys_file).read_text().splitlines() if line.strip()]
    return [k.encode() for k in keys]


def key_id(key: bytes) -> str:
    """What Redis and the logs see of a key: a short hash, never the key."""
    return hashlib.sha256(key).hexdigest()[:16]


class RateLimiter:
    """Requests and tokens per API key per clock minute, counted atomically in Redis."""

    def __init__(self, broker: BrokerClient, rpm: int, tpm: int) -> None:
        self.broker = broker
        self.rpm = rpm
        self.tpm = tpm

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    async def admit(self, kid: str) -> float | None:
        """None if admitted (and counted); else the seconds until the next window."""
        now = time.time()
        minute = int(now // 60)
        k = self.broker.keys
        ok = await self.broker.scripts.ratelimit(
            keys=[k.rate(kid, minute, "requests"), k.rate(kid, minute, "tokens")],
            args=[self.rpm, self.tpm, 120_000])
        return None if ok else 60 - (now % 60)

    async def spend(self, kid: str, tokens: int) -> None:
        if not self.tpm or not tokens:
            return
        key = self.broker.keys.rate(kid, int(time.time() // 60), "tokens")
        async with self.broker.raw.pipeline(transaction=True) as pipe:
            pipe.incrby(key, tokens)
            pipe.pexpire(key, 120_000)
            await pipe.execute()


class APIKeyMiddleware:
    """Every route but the open ones needs ``Authorization: Bearer <key>``; keys compare in constant time.

    The web UI's static files stay open (they hold no data); the UI sends the
    key with its API calls.
    """

    def __init__(self, app: ASGIApp, keys: list[bytes], open_paths: list[str], limiter: RateLimiter) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = set(open_paths)
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or self._open(scope["path"]):
            await self.app(scope, receive, send)
            return
        presented = _bearer(scope)
        match = None
        for key in self.keys:  # no early exit: timing tells nothing about which key nearly matched
            if hmac.compare_digest(presented, key):
                match = key
        if match is None:
            message = "Missing API key: send 'Authorization: Bearer <key>'." if not presented \
                else "Incorrect API key provided."
            await _reply(send, 401, error_body(message, "authentication_error", None, "invalid_api_key"))
            return
        kid = key_id(match)
        scope.setdefault("state", {})["api_key_id"] = kid
        if self.limiter.enabled and scope["method"] == "POST":
            wait = await self.limiter.admit(kid)
            if wait is not None:
                body = error_body(f"Rate limit reached for this API key ({self.limiter.rpm} requests or "
                                  f"{self.limiter.tpm} tokens per minute).", "rate_limit_error", None,
                                  "rate_limit_exceeded")
                await _reply(send, 429, body, {"retry-after": str(max(1, int(wait + 0.999)))})
                return
        await self.app(scope, receive, send)

    def _open(self, path: str) -> bool:
        return path in self.open_paths or not (path.startswith("/v1/") or path.startswith("/api/")
                                                or path == "/tokenize" or path in ("/health", "/metrics"))


class BodyLimitMiddleware:
    """Refuse bodies over the cap: by Content-Length up front; a chunked body is read (up to the cap) first."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: tuple[str, ...] = ()) -> None:
        """``exempt``: path prefixes that enforce their own, larger cap (batch file uploads)."""
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await _reply(send, 400, self._error())
                return
            await self.app(scope, receive, send)
            return
        body = bytearray()
        more = scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await _reply(send, 400, self._error())
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _error(self) -> dict[str, Any]:
        return error_body(f"The request body exceeds the limit of {self.max_bytes} bytes (max_body_bytes).",
                          "invalid_request_error", None, "body_too_large")


def _bearer(scope: Scope) -> bytes:
    header = dict(scope["headers"]).get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


async def _reply(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
