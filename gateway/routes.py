"""The OpenAI-compatible routes."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from broker.client import BrokerClient
from broker.errors import ServeError
from broker.ids import request_id
from broker.protocol import Embed, Embeddings, Event, Failure, JobKind, Params, Text, TokenCount
from gateway import limits
from gateway.disconnect import ClientGone, unless_disconnected
from gateway.errors import APIError
from gateway.generation import first_reply, generate, submit
from gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from gateway.security import RateLimiter, tenant_of

router = APIRouter()


def _broker(request: Request) -> BrokerClient:
    return request.app.state.broker


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """What a load balancer needs: 200 while this gateway reaches Redis, 503 (from the Redis handler) when not."""
    await _broker(request).ping()
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Models with at least one live worker."""
    workers = await _broker(request).live_workers()
    models: dict[str, dict[str, Any]] = {}
    for w in workers:
        for m in w.models:
            entry = models.setdefault(m, {"id": m, "object": "model", "created": int(w.started_at),
                                          "owned_by": "redserve", "workers": 0, "context_length": None,
                                          "max_model_len": None, "root": m, "engines": []})
            entry["created"] = min(entry["created"], int(w.started_at))
            entry["workers"] += 1
            if w.engine not in entry["engines"]:
                entry["engines"].append(w.engine)
            if w.context_of(m):
                entry["context_length"] = entry["max_model_len"] = w.context_of(m)
            if w.root_of(m):
                entry["root"] = w.root_of(m)
    return {"object": "list", "data": sorted(models.values(), key=lambda m: m["id"])}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    for entry in (await list_models(request))["data"]:
        if entry["id"] == model:
            return entry
    raise APIError(404, f"The model `{model}` does not exist or has no live worker.", param="model",
                   code="model_not_found")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await generate(request, _broker(request), body, JobKind.CHAT, prefix=body.echoed)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await generate(request, _broker(request), body, JobKind.COMPLETION)  # echo: the worker starts with it


@router.post("/v1/requests/{response_id}/cancel")
async def cancel_request(response_id: str, request: Request) -> dict[str, Any]:
    """Cancel a running or queued request by the id its response carries (any gateway may be asked)."""
    rid = request_id(response_id)
    worker = await _broker(request).cancel(rid, tenant_of(request)) if rid else None
    if worker is None:
        raise APIError(404, f"No request `{response_id}` is known (it may have finished long ago).",
                       param="id", code="request_not_found")
    return {"id": response_id, "object": "request.cancellation", "cancelled": True, "worker": worker}


@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> Any:
    """Count a prompt's tokens on a worker of the model, and say whether it fits the context."""
    ev = await _one_reply(request, body.model, JobKind.TOKENIZE, body.job_params(), 0)
    if isinstance(ev, Response):
        return ev
    assert isinstance(ev, TokenCount)
    ctx = ev.context_length or None
    fits = None if ctx is None else ev.count + (body.max_tokens or 0) <= ctx
    return {"model": body.model, "count": ev.count, "max_model_len": ctx, "fits": fits, "tokens": ev.ids,
            "token_strs": ev.strs}


@router.post("/detokenize")
@router.post("/v1/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
    """Token ids back to text, on a worker of the model (vLLM's endpoint)."""
    ev = await _one_reply(request, body.model, JobKind.DETOKENIZE, body.job_params(), 0)
    if isinstance(ev, Response):
        return ev
    assert isinstance(ev, Text)
    return {"model": body.model, "prompt": ev.text}


async def _one_reply(request: Request, model: str, kind: JobKind, params: Params,
                     tokens: int) -> Event | Response:
    """Submit a job whose answer is a single terminal event; errors become OpenAI errors.

    ``tokens`` are reserved against the tenant's token budget and settled to the reply's prompt tokens.
    """
    broker = _broker(request)
    tenant = tenant_of(request)
    limiter: RateLimiter = request.app.state.limiter
    held = await limiter.reserve(tenant, tokens) if tokens else None
    used = 0
    try:
        stream = await submit(request, broker, model, kind, params)
        try:
            events = await unless_disconnected(request, first_reply(stream))
        except ClientGone:
            return Response(status_code=499)
        finally:
            await broker.release(stream)
        ev = events[-1]  # a lone terminal event: the job cannot restart past its first message
        if isinstance(ev, Failure):
            raise ServeError.from_event(ev)
        used = ev.usage.prompt_tokens if isinstance(ev, Embeddings) else 0
        return ev
    finally:
        await limiter.settle(held, used)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    inputs = body.inputs
    limits.check_texts(inputs, "input", _broker(request).settings)
    ev = await _one_reply(request, body.model, JobKind.EMBEDDING, Embed(inputs, body.dimensions),
                          limits.estimate_text_tokens(inputs))
    if isinstance(ev, Response):
        return ev
    assert isinstance(ev, Embeddings)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(ev.vectors)]
    p = ev.usage.prompt_tokens
    return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": p, "total_tokens": p}}


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

