"""Errors reach the client in OpenAI's shape, with the right status, and never hang."""

from __future__ import annotations

import httpx
import openai
import pytest
from support import sse_events

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


async def test_completions_reject_empty_prompts_and_suffix(stack):
    gw = await stack.gateway()
    for prompt in ([], [[1, 2], []]):
        r = await post(gw, "/v1/completions", json={"model": "echo", "prompt": prompt})
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
            data = [d async for _, d in sse_events(r)]
    assert '"worker_timeout"' in data[-2] and '"error"' in data[-2]
    assert data[-1] == "[DONE]"
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


async def test_every_route_answers_503_when_redis_is_down():
    """Walk every route of the app's OpenAPI schema with Redis stopped: 503 and Retry-After, never a 500."""
    from support import Stack

    from broker.settings import Settings
    from gateway.app import create_app
    from redserve.redis_server import RedisServer

    hexid = "0123456789abcdef" * 2
    params = {"file_id": f"file-{hexid[:24]}", "batch_id": f"batch_{hexid}", "response_id": f"chatcmpl-{hexid}",
              "model": "echo", "battle_id": hexid}
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    arena = "/api/arena/battles/{battle_id}"
    bodies = {"/v1/chat/completions": chat, "/v1/completions": {"model": "echo", "prompt": "hi"},
              "/v1/embeddings": {"model": "echo", "input": "hi"}, "/tokenize": {"model": "echo", "prompt": "hi"},
              "/v1/tokenize": {"model": "echo", "prompt": "hi"},
              "/detokenize": {"model": "echo", "tokens": [1]}, "/v1/detokenize": {"model": "echo", "tokens": [1]},
              "/v1/batches": {"input_file_id": params["file_id"], "endpoint": "/v1/chat/completions"},
              "/api/votes": {"winner": "tie", "left_model": "a", "right_model": "b", "prompt": "p"},
              f"{arena}/turns": {"content": "hi"}, f"{arena}/vote": {"winner": "a"},
              "/api/feedback": {"model": "echo", "rating": "up", "reply": "r", "messages": [chat["messages"][0]]}}
    with RedisServer() as server:
        settings = Settings(redis_url=server.url, reply_timeout=5, api_keys=["sk-k"], rpm_limit=1000,
                            tpm_limit=100_000, admin_api_keys=["sk-admin"])
        stack = Stack(settings)
        try:
            gw = await stack.gateway()
            server.stop()
            schema = create_app(server.url, settings).openapi()["paths"]
            routes = [(m.upper(), path) for path, ops in schema.items() for m in ops]
            assert len(routes) >= 15
            async with httpx.AsyncClient(base_url=gw.url, timeout=10,
                                         headers={"Authorization": "Bearer sk-admin"}) as http:
                for method, template in routes:
                    path = template.format(**{k: v for k, v in params.items() if "{" + k in template})
                    path = path.replace(":path}", "")
                    kw: dict = {}
                    if template == "/v1/files" and method == "POST":
                        kw["files"] = {"file": ("x.jsonl", b"{}\n")}
                        kw["data"] = {"purpose": "batch"}
                    elif method == "POST":
                        kw["json"] = bodies.get(template, {})
                    r = await http.request(method, path, **kw)
                    assert r.status_code == 503, (method, path, r.status_code, r.text)
                    assert r.headers.get("retry-after") == "1", (method, path)
                    assert r.json()["error"]["code"] == "redis_unavailable", (method, path)
                assert (await http.get("/metrics")).status_code == 200  # this process's own counters
        finally:
            await stack.close()


async def test_a_full_redis_is_a_503_and_loses_nothing(stack, redis):
    """At maxmemory with noeviction Redis refuses writes: new work gets 503 with Retry-After, reads still work."""
    await stack.worker()
    gw = await stack.gateway()
    await redis.xadd("redserve:votes", {"winner": "tie"})
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    vote = {"winner": "tie", "left_model": "a", "right_model": "b", "prompt": "p"}
    await redis.config_set("maxmemory", "1")
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
            for method, path, kw in (("POST", "/v1/chat/completions", {"json": chat}),
                                     ("POST", "/api/votes", {"json": vote}),
                                     ("POST", "/v1/files", {"files": {"file": ("x.jsonl", b"{}\n")},
                                                            "data": {"purpose": "batch"}})):
                r = await http.request(method, path, **kw)
                assert r.status_code == 503, (path, r.text)
                assert r.json()["error"]["code"] == "redis_out_of_memory" and r.headers["retry-after"] == "1"
            assert (await http.get("/v1/models")).status_code == 200  # reads go on
    finally:
        await redis.config_set("maxmemory", "0")
    assert await redis.xlen("redserve:votes") == 1  # nothing was evicted
    assert (await gw.client().chat.completions.create(**chat)).choices[0].message.content
