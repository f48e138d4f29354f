"""Two attacks on a gateway with API keys, measured: bodies sent without a key, and the tokens-per-minute limit.

    python -m bench.abuse preauth --connections 100    # chunked bodies with no key: RSS and time to 401
    python -m bench.abuse tpm --tpm-limit 100           # 20 concurrent requests and 10 abandoned streams

Each runs a private Redis, one echo worker and one gateway as separate
processes, and prints one JSON line. The figures in the security issue's
closing note come from these two commands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
from redis import Redis as SyncRedis

from bench.redserve_stack import memory_mb, redserve
from broker.keys import Keys
from broker.tenants import tenant_id

KEY_A, KEY_B = "sk-abuse-a", "sk-abuse-b"


def rss_mb(pid: int) -> float:
    return memory_mb(pid, "VmRSS")


async def _slow_body(host: str, port: int, chunk: int, interval: float, cap: int, seconds: float) -> float | None:
    """One connection sending a chunked body with no key; seconds until the server answered (None: never)."""
    reader, writer = await asyncio.open_connection(host, port)
    start = time.monotonic()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    answer = asyncio.ensure_future(reader.read(12))
    sent = 0
    try:
        while sent < cap and time.monotonic() - start < seconds:
            done, _ = await asyncio.wait([answer], timeout=interval)
            if done:
                break
            writer.write(b"%x\r\n%s\r\n" % (chunk, b"a" * chunk))
            sent += chunk
            try:
                await writer.drain()
            except ConnectionError:
                break
        done, _ = await asyncio.wait([answer], timeout=max(0.0, seconds - (time.monotonic() - start)))
        return time.monotonic() - start if done and answer.result().startswith(b"HTTP/1.1 ") else None
    finally:
        answer.cancel()
        writer.close()


async def preauth(a: argparse.Namespace) -> dict:
    with redserve(extra={"api_keys": [KEY_A, KEY_B]}) as st:
        host, port = st.url.removeprefix("http://").split(":")
        before = rss_mb(st.main_pid)
        peak = before
        attack = asyncio.gather(*(_slow_body(host, int(port), a.chunk, a.interval, a.cap, a.seconds)
                                  for _ in range(a.connections)))
        while not attack.done():
            peak = max(peak, rss_mb(st.main_pid))
            await asyncio.sleep(0.2)
        answered = [t for t in attack.result() if t is not None]
        await asyncio.sleep(1)
        return {"attack": "preauth", "connections": a.connections, "rss_before_mb": round(before, 1),
                "rss_peak_mb": round(peak, 1), "rss_after_mb": round(rss_mb(st.main_pid), 1),
                "answered": len(answered), "answer_p50_s": round(sorted(answered)[len(answered) // 2], 3)
                if answered else None, "answer_max_s": round(max(answered), 3) if answered else None}


async def _stream(http: httpx.AsyncClient, key: str, max_tokens: int, stop_after: int | None) -> int:
    """Tokens the client was billed by usage (0 when it was refused or left early)."""
    body = {"model": "echo", "messages": [{"role": "user", "content": "count to sixty for me please"}],
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            return 0
        seen = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            seen += 1
            if stop_after is not None and seen >= stop_after:
                return 0
            usage = json.loads(line[6:]).get("usage")
            if usage:
                return int(usage["total_tokens"])
    return 0


def _charged(redis_url: str, key: str, minute: int) -> int:
    with SyncRedis.from_url(redis_url) as r:
        return int(r.get(Keys().rate(tenant_id(key.encode()), minute, "tokens")) or 0)


async def tpm(a: argparse.Namespace) -> dict:
    with redserve(delay=0.01, max_tokens=a.max_tokens, extra={"api_keys": [KEY_A, KEY_B],
                                                              "tpm_limit": a.tpm_limit}) as st:
        if time.time() % 60 > 45:  # both halves inside one clock minute
            await asyncio.sleep(61 - time.time() % 60)
        minute = int(time.time() // 60)
        async with httpx.AsyncClient(base_url=st.url, timeout=60) as http:
            served = await asyncio.gather(*(_stream(http, KEY_A, a.max_tokens, None) for _ in range(a.concurrent)))
            await asyncio.gather(*(_stream(http, KEY_B, a.max_tokens, 3) for _ in range(a.abandoned)))
        await asyncio.sleep(2)  # the abandoned jobs' cancellations settle
        return {"attack": "tpm", "tpm_limit": a.tpm_limit, "concurrent": a.concurrent,
                "admitted": sum(1 for s in served if s), "tokens_served": sum(served),
                "abandoned": a.abandoned, "abandoned_charged": _charged(st.redis_url or "", KEY_B, minute)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="attack", required=True)
    pa = sub.add_parser("preauth")
    pa.add_argument("--connections", type=int, default=100)
    pa.add_argument("--chunk", type=int, default=64 * 1024)
    pa.add_argument("--interval", type=float, default=0.25, help="seconds between chunks")
    pa.add_argument("--cap", type=int, default=5 * 2**20, help="bytes each connection sends at most")
    pa.add_argument("--seconds", type=float, default=25.0)
    tp = sub.add_parser("tpm")
    tp.add_argument("--tpm-limit", type=int, default=100)
    tp.add_argument("--concurrent", type=int, default=20)
    tp.add_argument("--abandoned", type=int, default=10)
    tp.add_argument("--max-tokens", type=int, default=60)
    a = p.parse_args()
    print(json.dumps(asyncio.run(preauth(a) if a.attack == "preauth" else tpm(a))), flush=True)


if __name__ == "__main__":
    main()
