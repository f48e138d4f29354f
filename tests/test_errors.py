"""Errors reach the client in OpenAI's shape, with the right status, and never hang."""

from __future__ import annotations

import httpx
import openai
import pytest

from broker.registry import Registry, WorkerRecord


def assert_openai_error(body: dict, *, code: str | None = None, param: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param


async def post(gw, path: str, **kw) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        return await http.post(path, **kw)


async def test_unknown_model_is_404(stack):
    await stack.worker()
    gw = await stack.gateway()
    with pytest.raises(openai.NotFoundError) as exc:
        await gw.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert_openai_error(exc.value.body and {"error": exc.value.body}, code="model_not_found", param="model")


async def test_model_without_live_worker_is_503(stack):
    w = await stack.worker(["gone"])
    gw = await stack.gateway()
    w.drain()
    await stack.workers[-1][1]  # drained and deregistered
    with pytest.raises(openai.InternalServerError) as exc:
        await gw.client().chat.completions.create(model="gone", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 503


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "echo"}, "messages"),
        ({"model": "echo", "messages": []}, "messages"),
        ({"model": "echo", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
        ({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
        ({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "tools": []}, "tools"),
        ({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
async def test_invalid_chat_body_is_400(stack, body, param):
    gw = await stack.gateway()
    r = await post(gw, "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert_openai_error(r.json(), param=param)


async def test_malformed_json_is_400(stack):
    gw = await stack.gateway()
    r = await post(gw, "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert_openai_error(r.json())


async def test_completions_reject_several_prompts_and_suffix(stack):
    gw = await stack.gateway()
    r = await post(gw, "/v1/completions", json={"model": "echo", "prompt": ["a", "b"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = await post(gw, "/v1/completions", json={"model": "echo", "prompt": "a", "suffix": "z"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


async def test_echo_worker_rejects_embeddings_in_band(stack):
    await stack.worker()
    gw = await stack.gateway()
    with pytest.raises(openai.BadRequestError) as exc:
        await gw.client().embeddings.create(model="echo", input="hi")
    assert "embeddings" in str(exc.value)


async def silent_worker(redis, keys, wid: str = "silent", **kw) -> WorkerRecord:
    """A registered worker that never reads its stream (a hung engine)."""
    rec = WorkerRecord(id=wid, models=["echo"], engine="test", **kw)
    await Registry(redis, keys).heartbeat(rec, 60)
    return rec


async def test_silent_worker_gives_504_when_not_streaming(stack, redis, keys):
    await silent_worker(redis, keys)
    gw = await stack.gateway(reply_timeout=1.0)
    with pytest.raises(openai.APIStatusError) as exc:
        await gw.client().chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 504
    assert exc.value.body["code"] == "worker_timeout"


async def test_silent_worker_gives_error_event_when_streaming(stack, redis, keys):
    await silent_worker(redis, keys)
    gw = await stack.gateway(reply_timeout=1.0)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        async with http.stream("POST", "/v1/chat/completions", json={
            "model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data:")]
    assert '"worker_timeout"' in lines[-2] and '"error"' in lines[-2]
    assert lines[-1] == "data: [DONE]"
    # And the official client surfaces it as an error, not a silent end.
    stream = await gw.client().chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


async def test_full_queues_answer_429_with_retry_after(stack, redis, keys):
    await silent_worker(redis, keys, max_queue=1)
    gw = await stack.gateway(reply_timeout=5.0)
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    import asyncio

    first = asyncio.create_task(post(gw, "/v1/chat/completions", json=body))  # fills the only slot
    await asyncio.sleep(0.3)
    r = await post(gw, "/v1/chat/completions", json=body)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert_openai_error(r.json(), code="queue_full")
    first.cancel()
