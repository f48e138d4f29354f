"""The small endpoints users of vLLM's server expect: /tokenize with token strings, /detokenize, model metadata,
and CORS for browser apps."""

from __future__ import annotations

import httpx
from test_hf_worker import serve


async def test_tokenize_then_detokenize_round_trips(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    base = str(client.base_url).removesuffix("/v1/")
    async with httpx.AsyncClient(base_url=base) as http:
        tok = (await http.post("/tokenize", json={"model": "tiny", "prompt": "Hello there, café"})).json()
        assert len(tok["tokens"]) == len(tok["token_strs"]) == tok["count"] and tok["max_model_len"] == 4096
        assert "".join(tok["token_strs"][1:]) == "Hello there, café"  # after <|bos|>; bytes joined back into text
        back = (await http.post("/detokenize", json={"model": "tiny", "tokens": tok["tokens"][1:]})).json()
        assert back == {"model": "tiny", "prompt": "Hello there, café"}
        bad = await http.post("/v1/detokenize", json={"model": "tiny", "tokens": [10**6]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    [model] = (await client.models.list()).data
    assert model.model_extra["max_model_len"] == 4096 and model.model_extra["root"] == str(tiny_dir)
    assert model.model_extra["engines"] == ["hf"]


async def test_an_engine_without_a_tokenizer_says_so(stack):
    await stack.worker(["echo"])
    gw = await stack.gateway()
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/detokenize", json={"model": "echo", "tokens": [1, 2]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported"
        r = await http.post("/tokenize", json={"model": "echo", "prompt": "two words"})
        assert r.json()["count"] == 2 and r.json()["token_strs"] is None


async def test_cors_is_off_by_default_and_answers_preflights_when_on(stack):
    await stack.worker(["echo"])
    closed, open_ = await stack.gateway(), await stack.gateway(cors_origins=["https://app.example"],
                                                                api_keys=["sk-cors"])
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    async with httpx.AsyncClient() as http:
        r = await http.options(f"{closed.url}/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = await http.options(f"{open_.url}/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = await http.post(f"{open_.url}/v1/chat/completions", headers={"Origin": "https://app.example",
                                                                         "Authorization": "Bearer sk-cors"},
                            json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = await http.post(f"{open_.url}/v1/chat/completions", headers={"Origin": "https://evil.example"},
                            json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and "access-control-allow-origin" not in r.headers
