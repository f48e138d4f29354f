"""The official openai client against a real gateway, echo worker and Redis."""

from __future__ import annotations

import pytest

from workers.echo import echo_tokens

PROMPT = "the quick brown fox"


def expected(n: int) -> str:
    return "".join(echo_tokens(PROMPT, n))


async def test_models_lists_live_models(stack):
    await stack.worker(["echo", "echo-2"])
    gw = await stack.gateway()
    models = await gw.client().models.list()
    assert sorted(m.id for m in models.data) == ["echo", "echo-2"]
    assert all(m.object == "model" and m.owned_by == "redserve" for m in models.data)
    assert (await gw.client().models.retrieve("echo-2")).id == "echo-2"


async def test_chat_non_streaming(stack):
    await stack.worker()
    gw = await stack.gateway()
    r = await gw.client().chat.completions.create(
        model="echo", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected(8)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


async def test_chat_streaming_token_deltas_and_usage(stack):
    await stack.worker(echo_delay=0.01)
    gw = await stack.gateway()
    stream = await gw.client().chat.completions.create(
        model="echo", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # Deltas, not cumulative text: with a 10 ms inter-token delay each token is its own chunk.
    assert contents == echo_tokens(PROMPT, 5)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert len({c.id for c in chunks}) == 1


async def test_chat_n_choices(stack):
    await stack.worker()
    gw = await stack.gateway()
    r = await gw.client().chat.completions.create(
        model="echo", messages=[{"role": "user", "content": PROMPT}], n=3, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert {c.message.content for c in r.choices} == {expected(4)}
    assert r.usage.completion_tokens == 12


async def test_completions_streaming_and_not(stack):
    await stack.worker()
    gw = await stack.gateway()
    r = await gw.client().completions.create(model="echo", prompt=PROMPT, max_tokens=3)
    assert r.object == "text_completion"
    assert r.choices[0].text == expected(3)
    assert r.choices[0].finish_reason == "length"
    stream = await gw.client().completions.create(model="echo", prompt=PROMPT, max_tokens=3, stream=True, echo=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == PROMPT + expected(3)


async def test_health(stack):
    await stack.worker()
    gw = await stack.gateway()
    import httpx

    async with httpx.AsyncClient() as http:
        r = await http.get(f"{gw.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}  # what a load balancer needs, nothing more


@pytest.mark.parametrize("stream", [False, True])
async def test_many_concurrent_requests_all_complete(stack, stream):
    await stack.worker(max_concurrency=16, echo_delay=0.002)
    await stack.worker(max_concurrency=16, echo_delay=0.002)
    gw = await stack.gateway()
    client = gw.client()
    import asyncio

    async def one(i: int) -> str:
        prompt = f"request number {i}"
        if not stream:
            r = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": prompt}])
            return r.choices[0].message.content
        s = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": prompt}],
                                                 stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

    results = await asyncio.gather(*(one(i) for i in range(64)))
    assert results == ["".join(echo_tokens(f"request number {i}", 8)) for i in range(64)]


async def test_tokenize_on_the_echo_engine_counts_words(stack):
    import httpx

    await stack.worker()
    gw = await stack.gateway()
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/tokenize", json={"model": "echo", "prompt": PROMPT})
        assert r.json() == {"model": "echo", "count": 4, "max_model_len": None, "fits": None, "tokens": None,
                            "token_strs": None}
        r = await http.post("/v1/tokenize", json={"model": "nope", "prompt": PROMPT})
        assert r.status_code == 404


async def test_a_silent_stream_is_sent_keepalive_comments_and_still_completes(stack):
    """Between tokens 0.5 s apart a stream with keepalive 0.2 s gets SSE comments, which the official client
    ignores (a comment line with no blank line after it: a blank one would make the openai client, which keeps
    the last event id, parse an empty event as JSON); the reply is whole."""
    import httpx

    await stack.worker(echo_delay=0.5, echo_tokens=3)
    gw = await stack.gateway(keepalive=0.2)
    body = {"model": "echo", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http, \
            http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines()]
    assert sum(line == ": ping" for line in lines) >= 3  # ~1 s of silence in all
    assert lines[-2] == "data: [DONE]"
    stream = await gw.client().chat.completions.create(model="echo", stream=True,
                                                       messages=[{"role": "user", "content": PROMPT}])
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == expected(3)
