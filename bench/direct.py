"""The "direct" baseline: one SSE server that generates the echo tokens itself, no broker.

    python -m bench.direct --port 9000 --delay 0

It speaks just enough of /v1/chat/completions for the load generator, with the
same token contract as the echo worker, so redserve's relay cost is the gap
between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from workers.echo import echo_tokens


def app(delay: float) -> Starlette:
    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "echo", "object": "model", "workers": 1}]})

    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        tokens = echo_tokens(body["messages"][-1]["content"], body.get("max_tokens") or 16)
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": "echo",
                   "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
                   "usage": usage}
            return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()

        async def events():  # noqa: ANN202
            yield chunk({"role": "assistant", "content": ""})
            for tok in tokens:
                if delay:
                    await asyncio.sleep(delay)
                yield chunk({"content": tok})
            yield chunk({}, "length")
            yield chunk({}, usage={"prompt_tokens": 3, "completion_tokens": len(tokens),
                                   "total_tokens": 3 + len(tokens)})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(_: Request) -> Response:  # vllm-router probes a worker's /health before it starts routing
        return Response()

    return Starlette(routes=[Route("/v1/models", models), Route("/health", health),
                             Route("/v1/chat/completions", chat, methods=["POST"])])


@contextlib.contextmanager
def serve(delay: float = 0.0) -> Iterator[Stack]:  # noqa: F821
    """This server in its own process, for the matrix (bench/matrix.py)."""
    from bench.redserve_stack import server_process

    with server_process(["bench.direct", "--delay", str(delay)]) as stack:
        yield stack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--delay", type=float, default=0.0)
    a = p.parse_args()
    uvicorn.run(app(a.delay), host="127.0.0.1", port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
