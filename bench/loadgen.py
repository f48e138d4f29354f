"""A load generator for any OpenAI-compatible server: streamed chat, fixed concurrency, checked replies.

    python -m bench.loadgen --url http://127.0.0.1:8000 --model echo -c 16 -n 400 --max-tokens 64

Reports tokens/s delivered, time to first token and end-to-end latency
percentiles, and errors. Every reply is checked: it must end with [DONE] and
carry exactly ``max_tokens`` completion tokens (the echo engine's contract, and
the tiny model's under greedy decoding, which never ends a reply early).

``--check-echo`` also checks the reply's text is the echo engine's (the prompt's
words cycled). ``--count-chunks`` is for servers that send no ``usage`` when
streaming (FastChat 0.2.36 ignores ``stream_options``): the completion token count
is then the number of content chunks, which must still equal ``max_tokens``.
Without it a reply lacking ``usage`` is an error.

It runs on aiohttp, whose HTTP parser is C: on a 2-core machine the load
generator shares the CPU with the server it measures, and httpx's pure-Python
HTTP/1.1 cost twice as much CPU per streamed chunk, which every system paid
for in throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import aiohttp

from workers.echo import echo_tokens


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    chunks: int = 0
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0

    def summary(self) -> dict[str, float]:
        def pct(xs: list[float], p: float) -> float:
            return statistics.quantiles(xs, n=100, method="inclusive")[p - 1] * 1000 if len(xs) > 1 else (
                xs[0] * 1000 if xs else float("nan"))

        return {
            "requests": len(self.latency),
            "errors": len(self.errors),
            "tokens_per_s": self.tokens / self.wall if self.wall else 0.0,
            "chunks_per_s": self.chunks / self.wall if self.wall else 0.0,
            "ttft_p50_ms": pct(self.ttft, 50), "ttft_p99_ms": pct(self.ttft, 99),
            "latency_p50_ms": pct(self.latency, 50), "latency_p99_ms": pct(self.latency, 99),
            "wall_s": self.wall,
        }


@dataclass
class _Stream:
    """What one streamed reply carried."""

    text: list[str] = field(default_factory=list)
    first: float | None = None
    tokens: int = 0
    done: bool = False
    error: str = ""


async def _read(r: aiohttp.ClientResponse, start: float) -> _Stream:
    s = _Stream()
    async for line in r.content:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].rstrip()
        if data == b"[DONE]":
            s.done = True
            break
        obj = json.loads(data)
        if "error" in obj:
            s.error = obj["error"]["message"]
            break
        if obj.get("usage"):
            s.tokens = obj["usage"]["completion_tokens"]
        if obj["choices"] and (content := obj["choices"][0]["delta"].get("content")):
            s.text.append(content)
            if s.first is None:
                s.first = time.perf_counter() - start
    return s


async def one(http: aiohttp.ClientSession, model: str, max_tokens: int, i: int, res: Result,
              check_echo: bool = False, count_chunks: bool = False) -> None:
    prompt = f"benchmark request {i}"
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    try:
        async with http.post("/v1/chat/completions", json=body) as r:
            if r.status != 200:
                res.errors.append(f"HTTP {r.status}: {(await r.read())[:200]!r}")
                return
            s = await _read(r, start)
    except (TimeoutError, aiohttp.ClientError) as exc:
        res.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if s.error:
        res.errors.append(s.error)
        return
    first, chunks, tokens, done, text = s.first, len(s.text), s.tokens, s.done, s.text
    if count_chunks:
        tokens = chunks
    if not done or tokens != max_tokens or first is None:
        res.errors.append(f"incomplete reply: done={done} tokens={tokens}")
        return
    if check_echo and "".join(text) != "".join(echo_tokens(prompt, max_tokens)):
        res.errors.append(f"wrong content: {''.join(text)[:80]!r}")
        return
    res.ttft.append(first)
    res.latency.append(time.perf_counter() - start)
    res.tokens += tokens
    res.chunks += chunks


async def run(url: str, model: str, concurrency: int, requests: int, max_tokens: int,
              check_echo: bool = False, count_chunks: bool = False) -> Result:
    res = Result()
    counter = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as http:
        async def lane() -> None:
            for i in counter:
                await one(http, model, max_tokens, i, res, check_echo, count_chunks)

        start = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        res.wall = time.perf_counter() - start
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="echo")
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.add_argument("-n", "--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--check-echo", action="store_true", help="check the text is the echo engine's reply")
    p.add_argument("--count-chunks", action="store_true",
                   help="count content chunks as completion tokens (servers that send no streamed usage)")
    a = p.parse_args()
    res = asyncio.run(run(a.url, a.model, a.concurrency, a.requests, a.max_tokens, a.check_echo, a.count_chunks))
    print(json.dumps(res.summary(), indent=2))
    for e in res.errors[:5]:
        print("error:", e)


if __name__ == "__main__":
    main()
