"""What the fault tests share: a streaming client that records exactly what it saw, and the tally."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
from support import sse_events


@dataclass
class StreamResult:
    """One streamed request as the client saw it."""

    content: str = ""
    chunks: int = 0
    error: dict[str, Any] | None = None
    done: bool = False
    id: str | None = None
    #: The longest wait between two chunks the client saw (seconds): the pause a fault cost it.
    max_gap: float = 0.0


async def stream_chat(base_url: str, content: str, *, timeout: float = 30.0, model: str = "echo",
                      stop_after: int | None = None, headers: dict[str, str] | None = None,
                      **body: Any) -> StreamResult:
    """Stream one chat request, recording deltas, an in-band error and [DONE]; never waits past ``timeout``."""
    res = StreamResult()
    payload = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True, **body}
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=headers) as http:
        async with asyncio.timeout(timeout):
            last = time.monotonic()  # the wait for the first chunk counts as a gap too
            async with http.stream("POST", "/v1/chat/completions", json=payload) as r:
                if r.status_code != 200:
                    res.error = json.loads(await r.aread())["error"]
                    return res
                async for _, data in sse_events(r):
                    now = time.monotonic()
                    res.max_gap, last = max(res.max_gap, now - last), now
                    if data == "[DONE]":
                        res.done = True
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        res.error = obj["error"]
                        continue
                    res.id = obj["id"]
                    if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                        res.content += obj["choices"][0]["delta"]["content"]
                        res.chunks += 1
                        if stop_after is not None and res.chunks >= stop_after:
                            break
    return res


def pauses(outcome: Any, results: list[Any]) -> None:
    """Note the client-visible pause (the longest gap between chunks) of each stream in the ledger."""
    outcome.pauses += [r.max_gap for r in results if isinstance(r, StreamResult)]


async def tally(outcome: Any, results: list[Any], expected: list[str]) -> None:
    """Count each result: a full correct reply is ok; an OpenAI-shaped error with [DONE] is clean; anything
    else (a wrong or partial reply without an error) is lost; a timeout is hung."""
    for res, want in zip(results, expected):
        outcome.requests += 1
        if isinstance(res, TimeoutError):
            outcome.hung += 1
        elif isinstance(res, BaseException):
            outcome.lost += 1
            outcome.notes.append(repr(res))
        elif isinstance(res, StreamResult) and res.error is not None:
            clean = {"message", "type", "param", "code"} <= res.error.keys() and (res.done or res.chunks == 0)
            outcome.clean_errors += clean
            outcome.lost += not clean
        elif (res.content if isinstance(res, StreamResult) else res) == want:
            outcome.ok += 1
        else:
            outcome.lost += 1
            outcome.notes.append(f"wrong reply {res!r}")
