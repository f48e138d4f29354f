"""ExternalAPIWorker: fronts any OpenAI-compatible upstream (OpenAI, TGI, vLLM, another redserve).

A TOML file maps each served model name to an upstream::

    [models.gpt-mini]
    base_url = "https://api.openai.com/v1"
    model = "gpt-4o-mini"            # upstream name (default: the served name)
    api_key_env = "OPENAI_API_KEY"   # read from the environment, never from the file

Streams are relayed as deltas; cancelling the job closes the upstream stream
(so the upstream stops too); upstream errors keep their status and message.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec

from broker.protocol import (
    FEATURES,
    ChoiceEnd,
    Delta,
    Done,
    Embed,
    Embeddings,
    Event,
    Generate,
    Job,
    JobKind,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from broker.settings import Settings
from workers.base import BaseModelWorker
from workers.errors import JobError


@dataclass(frozen=True)
class Upstream:
    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 600.0

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def load_upstreams(path: str | Path, environ: dict[str, str] | None = None) -> dict[str, Upstream]:
    """Parse the config file; a missing API key variable is an error at start, not at the first request."""
    env = os.environ if environ is None else environ
    data = tomllib.loads(Path(path).read_text())
    upstreams = {}
    for name, spec in (data.get("models") or {}).items():
        key_env = spec.get("api_key_env")
        if key_env and key_env not in env:
            raise ValueError(f"model {name!r}: environment variable {key_env} (its API key) is not set")
        upstreams[name] = Upstream(
            base_url=spec["base_url"].rstrip("/"),
            model=spec.get("model", name),
            api_key=env[key_env] if key_env else None,
            timeout=float(spec.get("timeout", 600.0)),
        )
    if not upstreams:
        raise ValueError(f"{path}: no [models.<name>] tables")
    return upstreams


class ExternalAPIWorker(BaseModelWorker):
    engine = "openai"
    #: Whatever the request asks goes to the upstream, which honours it or answers a 400 (relayed as is).
    features = FEATURES
    #: The upstream does the whole request (tool calls, echo); what it sends is relayed, not redone here.
    upstream = True

    def __init__(self, redis_url: str, settings: Settings, models: list[str], *, worker_id: str | None = None) -> None:
        if not settings.api_config:
            raise ValueError("the openai engine needs --api-config FILE (see workers/openai_api.py)")
        self.upstreams = load_upstreams(settings.api_config)
        unknown = [m for m in models if m not in self.upstreams]
        if unknown:
            raise ValueError(f"{settings.api_config} has no upstream for {', '.join(unknown)}")
        super().__init__(redis_url, settings, models, worker_id=worker_id)
        self.http: httpx.AsyncClient | None = None

    async def setup(self) -> None:
        limits = httpx.Limits(max_connections=self.settings.max_concurrency * 2)
        self.http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=10.0))

    async def teardown(self) -> None:
        if self.http is not None:
            await self.http.aclose()

    async def generate(self, job: Job) -> AsyncIterator[Event]:
        up = self.upstreams[job.model]
        assert isinstance(job.params, Generate)
        chat = job.kind is JobKind.CHAT
        body = {**upstream_body(job.params, chat=chat), "model": up.model, "stream": True,
                "stream_options": {"include_usage": True}}
        usage: dict[str, int] = {}
        tokens = 0
        assert self.http is not None
        async with self.http.stream("POST", up.base_url + ("/chat/completions" if chat else "/completions"),
                                    json=body, headers=up.headers(),
                                    timeout=up.timeout) as r:
            if r.status_code != 200:
                raise _upstream_error(r.status_code, await r.aread())
            async for chunk in _sse_json(r):
                if "error" in chunk:
                    raise _upstream_error(502, json.dumps(chunk).encode())
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    for ev in relayed(choice):
                        tokens += isinstance(ev, Delta)
                        yield ev
        # An upstream that ignores stream_options sends no usage: count chunks instead.
        yield Done(Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", tokens)))

    async def embed(self, job: Job) -> Embeddings:
        up = self.upstreams[job.model]
        assert self.http is not None and isinstance(job.params, Embed)
        r = await self.http.post(up.base_url + "/embeddings", headers=up.headers(), timeout=up.timeout,
                                 json={"model": up.model, "input": job.params.input, "encoding_format": "float",
                                       **({"dimensions": job.params.dimensions} if job.params.dimensions else {})})
        if r.status_code != 200:
            raise _upstream_error(r.status_code, r.content)
        data = r.json()
        vectors = [d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])]
        return Embeddings(vectors, Usage((data.get("usage") or {}).get("prompt_tokens", 0)))


def upstream_body(params: Generate, *, chat: bool) -> dict[str, Any]:
    """A job's parameters as the OpenAI (or vLLM) request they came from."""
    body: dict[str, Any] = msgspec.to_builtins(params)  # fields at their defaults are left out
    for internal in ("structured", "tool_choice", "tool_name", "logprobs", "logit_bias", "prompts"):
        body.pop(internal, None)
    if params.prompts:
        body["prompt"] = params.prompts
    if params.logprobs is not None:
        body |= {"logprobs": True, "top_logprobs": params.logprobs} if chat else {"logprobs": params.logprobs}
    if params.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    if params.tools:
        body["tool_choice"] = {"type": "function", "function": {"name": params.tool_name}} \
            if params.tool_choice == "function" else params.tool_choice
    s = params.structured
    if s is not None and s.json is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "schema",
                                                                          "schema": json.loads(s.json)}}
    elif s is not None and s.json_object:
        body["response_format"] = {"type": "json_object"}
    elif s is not None:  # vLLM's own extension; an OpenAI upstream refuses it, and says so
        body["structured_outputs"] = {k: v for k, v in msgspec.to_builtins(s).items()}
    return body


def relayed(choice: dict[str, Any]) -> list[Event]:
    """One upstream streamed choice as events: text (with its logprobs), tool call pieces, its end."""
    i = choice["index"]
    delta = choice.get("delta")
    text = delta.get("content") if delta is not None else choice.get("text")
    out: list[Event] = []
    logprobs = _logprobs(choice.get("logprobs"))
    if text or logprobs:
        out.append(Delta(i, text or "", max(1, len(logprobs or [])), logprobs))
    for call in (delta or {}).get("tool_calls") or []:
        fn = call.get("function") or {}
        out.append(ToolCall(i, call.get("index", 0), fn.get("arguments") or "", call.get("id"), fn.get("name")))
    if choice.get("finish_reason"):
        out.append(ChoiceEnd(i, choice["finish_reason"]))
    return out


def _logprobs(lp: dict[str, Any] | None) -> list[TokenLogprob] | None:
    """OpenAI's logprobs, chat (``content``) or completions (``tokens``...), as the protocol's entries."""
    if not lp:
        return None
    if "content" in lp:
        return [TokenLogprob(e["token"], e["logprob"], [TopLogprob(t["token"], t["logprob"])
                                                        for t in e.get("top_logprobs") or []])
                for e in lp["content"] or []]
    tops = lp.get("top_logprobs") or [None] * len(lp.get("tokens") or [])
    return [TokenLogprob(t, v, [TopLogprob(k, w) for k, w in (top or {}).items()])
            for t, v, top in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], tops)]


async def _sse_json(r: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in r.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _upstream_error(status: int, raw: bytes) -> JobError:
    """Keep the upstream's status and OpenAI-shaped message where it has one."""
    try:
        err = json.loads(raw)["error"]
        if isinstance(err, str):
            err = {"message": err}
    except (ValueError, KeyError, TypeError):
        err = {"message": raw.decode(errors="replace")[:500] or f"upstream answered {status}"}
    return JobError(f"upstream: {err.get('message')}", status=status, type=err.get("type") or "upstream_error",
                    code=err.get("code"), param=err.get("param"))
