"""What one request costs a gateway process, against the floor of the frameworks it is built on.

    python -m bench.floor                 # C = 64, 2,000 one-token streams per server
    python -m bench.floor --serve 'fastapi + sse-starlette' --port 9001   # one floor server, by hand

Three servers answer the same streamed chat request (validated with
redserve's own request model) with one token:

- **fastapi**: a FastAPI route returning a plain ``StreamingResponse``;
- **fastapi+sse-starlette**: the same route returning sse-starlette's
  ``EventSourceResponse`` (with the gateway's ping and send timeout);
- **redserve gateway**: the real gateway, dispatching to an echo worker
  through Redis (only the gateway process's CPU is counted).

The CPU each server process spends per request shows how much of the
gateway's per-request cost is its own work and how much the frameworks'.
This cost, paid one request after another in one process, is what sets
time to first token when hundreds of streams start at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI
from sse_starlette.sse import EventSourceResponse
from starlette.responses import StreamingResponse

from bench.loadgen import run
from bench.redserve_stack import Stack, cpu_seconds, redserve, server_process
from gateway.schemas import ChatCompletionRequest

FLOORS = ("fastapi", "fastapi + sse-starlette")


def floor_app(kind: str) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "echo", "object": "model", "workers": 1}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> StreamingResponse:
        text = body.messages[-1].content.split()[0]  # the echo engine's first token

        async def events() -> AsyncIterator[bytes]:
            chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
            yield f"data: {json.dumps(chunk)}\r\n\r\ndata: {json.dumps(usage)}\r\n\r\ndata: [DONE]\r\n\r\n".encode()

        if kind == "fastapi + sse-starlette":
            return EventSourceResponse(events(), ping=15, send_timeout=30)
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def floor_server(kind: str) -> contextlib.AbstractContextManager[Stack]:
    return server_process(["bench.floor", "--serve", kind])


def measure(concurrency: int = 64, requests: int = 2000) -> list[dict]:
    """Per-request CPU of each server process, one-token streams at ``concurrency``."""
    rows = []
    servers = [(kind, floor_server(kind)) for kind in FLOORS] + [("redserve gateway", redserve(1, 0.0, 1))]
    for name, server in servers:
        with server as st:
            asyncio.run(run(st.url, st.model, 4, 16, 1))  # warm-up
            before = cpu_seconds(st.main_pid)
            t0 = time.perf_counter()
            res = asyncio.run(run(st.url, st.model, concurrency, requests, 1))
            wall = time.perf_counter() - t0
            cpu = cpu_seconds(st.main_pid) - before
        rows.append({"server": name, "requests": len(res.latency), "errors": len(res.errors),
                     "cpu_us_per_request": round(cpu / requests * 1e6), "requests_per_s": round(requests / wall),
                     "ttft_p50_ms": round(res.summary()["ttft_p50_ms"], 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", choices=FLOORS, help="run one floor server instead of measuring")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("-n", "--requests", type=int, default=2000)
    a = p.parse_args()
    if a.serve:
        uvicorn.run(floor_app(a.serve), host="127.0.0.1", port=a.port, log_level="warning", access_log=False)
    else:
        measure(a.concurrency, a.requests)


if __name__ == "__main__":
    main()
