"""A synthetic FastChat model worker that emits redserve's echo tokens (run with the FastChat venv's python).

    bench/.venv-fastchat/bin/python bench/fastchat_echo_worker.py \
        --controller-address http://127.0.0.1:21001 --port 21002 --delay 0.02

It subclasses ``fastchat.serve.base_model_worker.BaseModelWorker`` and is served
by that module's own FastAPI app, so the request path is FastChat's: the
openai_api_server asks the controller for a worker, asks the worker for the
prompt's token count and context length, then streams ``/worker_generate_stream``
(null-byte-delimited JSON, cumulative ``text``). The tokens are the echo
engine's (``workers/echo.py``: the prompt's words cycled, ``max_new_tokens`` of
them, ``delay`` seconds apart); the conversation template is FastChat's "raw"
one, so the prompt the worker sees is the user message itself.

The generator is asynchronous (as FastChat's vLLM worker's is), so a stream
waiting between tokens holds no thread, and ``--limit-worker-concurrency``
defaults to 4096 instead of FastChat's 5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid

import uvicorn
from fastchat.serve import base_model_worker
from fastchat.serve.base_model_worker import BaseModelWorker


def echo_tokens(text: str, count: int) -> list[str]:
    """Same contract as workers/echo.py (copied: this venv has no redserve)."""
    words = text.split() or ["echo"]
    return [(" " if i else "") + words[i % len(words)] for i in range(count)]


class EchoWorker(BaseModelWorker):
    def __init__(self, *args, delay: float = 0.0, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.context_len = 1 << 20
        self.init_heart_beat()

    def make_conv_template(self, conv_template: str | None = None, model_path: str | None = None):  # noqa: ANN201
        # FastChat's default also imports fastchat.model.model_adapter, i.e. torch; "raw" needs neither.
        from fastchat.conversation import get_conv_template

        return get_conv_template(conv_template or "raw")

    def count_token(self, params: dict) -> dict:
        return {"count": len(params["prompt"].split()), "error_code": 0}

    async def generate_stream_gate(self, params: dict):  # noqa: ANN201
        self.call_ct += 1
        prompt = params["prompt"]
        n = int(params.get("max_new_tokens") or 16)
        prompt_tokens = len(prompt.split())
        text = ""
        tokens = echo_tokens(prompt, n)
        for i, tok in enumerate(tokens):
            if self.delay:
                await asyncio.sleep(self.delay)
            text += tok
            last = i == len(tokens) - 1
            ret = {
                "text": text,
                "error_code": 0,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": i + 1,
                          "total_tokens": prompt_tokens + i + 1},
                "finish_reason": "length" if last else None,
            }
            yield json.dumps(ret).encode() + b"\0"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=21002)
    p.add_argument("--controller-address", default="http://127.0.0.1:21001")
    p.add_argument("--model-name", default="echo")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--limit-worker-concurrency", type=int, default=4096)
    a = p.parse_args()
    EchoWorker(
        a.controller_address, f"http://{a.host}:{a.port}", uuid.uuid4().hex[:8], a.model_name, [a.model_name],
        a.limit_worker_concurrency, conv_template="raw", delay=a.delay,
    )
    uvicorn.run(base_model_worker.app, host=a.host, port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
