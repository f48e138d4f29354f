"""API keys, rate limits that hold across gateways, and input limits."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest


def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


CHAT = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 4}


async def test_api_keys_guard_every_api_route(stack, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("sk-from-file\n\n")
    await stack.worker()
    gw = await stack.gateway(api_keys=["sk-alpha"], api_keys_file=str(keyfile))
    async with httpx.AsyncClient(base_url=gw.url) as http:
        for key in (None, "sk-wrong", "sk-alph"):
            r = await http.post("/v1/chat/completions", json=CHAT, headers=headers(key))
            assert r.status_code == 401, key
            assert r.json()["error"]["type"] == "authentication_error"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        for path in ("/v1/models", "/api/fleet"):
            assert (await http.get(path)).status_code == 401, path
        assert (await http.post("/tokenize", json={"model": "echo", "prompt": "x"})).status_code == 401
        assert (await http.get("/health")).status_code == 200  # open by default, like /metrics
        assert (await http.get("/")).status_code == 200  # the UI's static page holds no data
    for key in ("sk-alpha", "sk-from-file"):
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
        assert (await client.chat.completions.create(**CHAT)).choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="nope", max_retries=0).models.list()


async def test_request_rate_limit_is_exact_across_gateways(stack):
    await stack.worker(max_concurrency=16)
    gws = [await stack.gateway(api_keys=["sk-a", "sk-b"], rpm_limit=5) for _ in range(2)]

    async def post(i: int, key: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=gws[i % 2].url) as http:
            return await http.post("/v1/chat/completions", json=CHAT, headers=headers(key))

    results = await asyncio.gather(*(post(i, "sk-a") for i in range(12)))
    codes = sorted(r.status_code for r in results)
    assert codes == [200] * 5 + [429] * 7  # exactly the limit, though two gateways shared the load
    refused = next(r for r in results if r.status_code == 429)
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert (await post(0, "sk-b")).status_code == 200  # another key has its own budget


async def test_token_rate_limit_counts_usage(stack):
    await stack.worker()
    gw = await stack.gateway(api_keys=["sk-t"], tpm_limit=20)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        codes = []
        for _ in range(4):  # each request: 4 prompt + 4 completion tokens with the echo engine
            body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers("sk-t")) as r:
                codes.append(r.status_code)
                await r.aread()
    assert codes == [200, 200, 200, 429]  # 24 tokens spent after three: the fourth is over 20


@pytest.mark.parametrize("body, param, setting", [
    ({**CHAT, "max_tokens": 10**6}, "max_tokens", "max_tokens_cap"),
    ({**CHAT, "n": 9}, "n", "max_n"),
    ({**CHAT, "messages": [{"role": "user", "content": "x"}] * 5}, "messages", "max_messages"),
    ({**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}, "messages", "max_prompt_chars"),
])
async def test_input_limits_name_the_limit(stack, body, param, setting):
    await stack.worker()
    gw = await stack.gateway(max_n=8, max_messages=4, max_prompt_chars=1000)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and setting in err["message"] and err["code"] == "limit_exceeded"


async def test_body_size_limit(stack):
    gw = await stack.gateway(max_body_bytes=2048)
    big = {**CHAT, "messages": [{"role": "user", "content": "y" * 5000}]}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

        async def chunks():
            for _ in range(10):
                yield b"z" * 1024

        r = await http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
