"""API keys, limits that hold (across gateways, under concurrency, for abandoned streams), input limits,
nothing read before authentication, and what is exposed without a key."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from faults.faultkit import stream_chat
from support import sse_events

from broker.keys import Keys
from broker.tenants import tenant_id


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


async def raw_request(url: str, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    await writer.drain()
    return reader, writer


CHUNKED = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n")


async def response_of(reader: asyncio.StreamReader, timeout: float = 2.0) -> tuple[int, dict, bool]:
    """(status, JSON body, whether the server then closed the connection)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status = int(head.split()[1])
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    body = json.loads(await asyncio.wait_for(reader.readexactly(length), timeout))
    try:
        closed = await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionError:
        closed = True
    return status, body, closed


@pytest.mark.parametrize("auth", [b"", b"Authorization: Bearer sk-wrong\r\n"])
async def test_unauthenticated_body_is_never_read(stack, auth):
    """A chunked body with no (or a wrong) key: 401 from the headers alone, then the connection is closed."""
    gw = await stack.gateway(api_keys=["sk-right"])
    reader, writer = await raw_request(gw.url, CHUNKED + auth + b"\r\n")  # not one byte of body sent
    status, body, closed = await response_of(reader)
    writer.close()
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and closed
    # With the right key the gateway does wait for the body (nothing answered yet).
    reader, writer = await raw_request(gw.url, CHUNKED + b"Authorization: Bearer sk-right\r\n\r\n")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.5)
    writer.close()


async def test_max_n_is_the_one_cap_on_n(stack):
    """``--max-n 32`` takes effect: n is capped by the setting alone (the schema once capped it at 16)."""
    await stack.worker(max_concurrency=4)
    gw = await stack.gateway(max_n=32)
    reply = await gw.client().chat.completions.create(model="echo", n=20, max_tokens=2,
                                                      messages=[{"role": "user", "content": "many choices"}])
    assert len(reply.choices) == 20
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "n": 33})
    assert r.status_code == 400 and "max_n" in r.json()["error"]["message"]


async def test_body_size_limit(stack):
    gw = await stack.gateway(max_body_bytes=2048)
    big = {**CHAT, "messages": [{"role": "user", "content": "y" * 5000}]}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", json=big)  # by Content-Length, before reading
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    # A chunked body is refused as soon as it passes the cap, while the client is still sending.
    reader, writer = await raw_request(gw.url, CHUNKED + b"\r\n")
    sent = 0
    answered = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
    for _ in range(64):  # up to 64 KiB, if nothing stopped it
        writer.write(b"400\r\n" + b"z" * 1024 + b"\r\n")
        sent += 1024
        await writer.drain()
        done, _ = await asyncio.wait([answered], timeout=0.05)
        if done:
            break
    assert answered.done(), "no answer while the body went on"
    assert 2048 < sent <= 4096  # answered right after the cap, not after the whole body
    head = answered.result()
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    writer.close()


async def test_in_flight_requests_per_key_are_capped(stack):
    await stack.worker(echo_delay=0.05, echo_tokens=40, max_concurrency=16)
    gw = await stack.gateway(api_keys=["sk-a", "sk-b"], max_in_flight_per_key=2)
    slow = [asyncio.create_task(stream_chat(gw.url, "slow " * 40, max_tokens=40, headers=headers("sk-a")))
            for _ in range(2)]
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", json=CHAT, headers=headers("sk-a"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_in_flight"
        assert (await http.post("/v1/chat/completions", json=CHAT, headers=headers("sk-b"))).status_code == 200
    assert all(res.error is None for res in await asyncio.gather(*slow))
    async with httpx.AsyncClient(base_url=gw.url) as http:  # the slots came back
        assert (await http.post("/v1/chat/completions", json=CHAT, headers=headers("sk-a"))).status_code == 200


async def _usage(gw, key: str, max_tokens: int) -> int:  # noqa: ANN001
    """Tokens a client was served (usage.total_tokens), 0 when refused."""
    body = {"model": "echo", "messages": [{"role": "user", "content": "count these words for me please"}],
            "max_tokens": max_tokens}
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        r = await http.post("/v1/chat/completions", json=body, headers=headers(key))
    if r.status_code == 429:
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
        return 0
    assert r.status_code == 200, r.text
    return r.json()["usage"]["total_tokens"]


def _minute_start() -> float:
    """Sleep out the end of a clock minute, so a test's requests all fall in one window."""
    left = 60 - time.time() % 60
    return left + 0.5 if left < 15 else 0.0


async def test_token_limit_holds_under_concurrency_across_gateways(stack, redis):
    await asyncio.sleep(_minute_start())
    await stack.worker(echo_delay=0.01, echo_tokens=30, max_concurrency=32)
    gws = [await stack.gateway(api_keys=["sk-t"], tpm_limit=100) for _ in range(2)]
    served = await asyncio.gather(*(_usage(gws[i % 2], "sk-t", 30) for i in range(20)))
    reservation = 30 + len("count these words for me please") // 4 + 4  # max_tokens + the prompt estimate
    assert 0 < sum(served) <= 100 + reservation, served  # before: all 20 admitted, 1,340 tokens served
    assert served.count(0) >= 15
    minute = int(time.time() // 60)
    charged = int(await redis.get(Keys().rate(tenant_id(b"sk-t"), minute, "tokens")) or 0)
    assert charged == sum(served)  # every reservation was settled to the true usage


async def test_abandoned_and_cancelled_streams_are_charged(stack, redis):
    await asyncio.sleep(_minute_start())
    await stack.worker(echo_delay=0.05, echo_tokens=60, max_concurrency=16)
    gw = await stack.gateway(api_keys=["sk-t"], tpm_limit=10_000)
    dropped = await asyncio.gather(*(stream_chat(gw.url, "drop me soon " * 30, max_tokens=60, stop_after=2,
                                                 headers=headers("sk-t")) for _ in range(5)))
    assert all(r.chunks == 2 for r in dropped)
    await asyncio.sleep(0.5)
    minute = int(time.time() // 60)
    key = Keys().rate(tenant_id(b"sk-t"), minute, "tokens")
    reservation = 60 + len("drop me soon " * 30) // 4 + 4
    assert int(await redis.get(key)) == 5 * reservation  # before: 0 charged
    # Cancelling one's own stream near its end does not refund it either.
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        body = {"model": "echo", "messages": [{"role": "user", "content": "drop me soon " * 30}], "max_tokens": 60,
                "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers("sk-t")) as r:
            events = sse_events(r)
            async for _, data in events:
                rid = json.loads(data)["id"]
                cancel = await http.post(f"/v1/requests/{rid}/cancel", headers=headers("sk-t"))
                assert cancel.status_code == 200
                break
            rest = [data async for _, data in events]
    assert any('"cancelled"' in line for line in rest)
    await asyncio.sleep(0.3)
    assert int(await redis.get(key)) == 6 * reservation
    # A request refused before any token (an unknown model) costs nothing.
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=headers("sk-t"))
        assert r.status_code == 404
    assert int(await redis.get(key)) == 6 * reservation


async def test_metric_labels_take_only_known_models(stack):
    await stack.worker()
    gw = await stack.gateway()
    async with httpx.AsyncClient(base_url=gw.url) as http:
        before = len((await http.get("/metrics")).content)
        await asyncio.gather(*(http.post("/v1/chat/completions", json={**CHAT, "model": f"made-up-{i}"})
                               for i in range(200)))
        text = (await http.get("/metrics")).text
    assert "made-up" not in text and 'model="unknown"' in text
    assert len(text) < before + 4096  # before: every name a series, 4 KB per name


async def test_docs_metrics_and_health_exposure(stack):
    await stack.worker()
    gw = await stack.gateway(api_keys=["sk-user"], admin_api_keys=["sk-admin"])
    async with httpx.AsyncClient(base_url=gw.url) as http:
        for path in ("/docs", "/redoc", "/openapi.json", "/metrics"):
            assert (await http.get(path)).status_code == 401, path
        for path in ("/docs", "/openapi.json"):
            assert (await http.get(path, headers=headers("sk-user"))).status_code == 200, path
        r = await http.get("/metrics", headers=headers("sk-user"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
        assert (await http.get("/metrics", headers=headers("sk-admin"))).status_code == 200
        r = await http.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}  # no gateway id, no fleet size
    gw = await stack.gateway(api_keys=["sk-user"], admin_api_keys=["sk-admin"], open_paths=["/health", "/metrics"],
                             api_docs=False)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        assert (await http.get("/metrics")).status_code == 200  # opened for a scraper, on purpose
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await http.get(path, headers=headers("sk-user"))).status_code == 404, path


LONE = "a\ud800b"  # a lone surrogate: valid JSON (\\ud800), no UTF-8 form


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "stop": [LONE]}, "stop.0"),
    ("/v1/completions", {"model": "echo", "prompt": LONE}, "prompt"),
    ("/v1/embeddings", {"model": "echo", "input": [LONE]}, "input.0"),
    ("/tokenize", {"model": "echo", "prompt": LONE}, "prompt"),
    ("/v1/chat/completions", {**CHAT, LONE: 1}, f"{LONE}"),
    ("/v1/chat/completions", {**CHAT, "top_k": 2**64 + 1}, "top_k"),
    ("/v1/chat/completions", {**CHAT, "seed": -(2**70)}, "seed"),
    ("/v1/completions", {"model": "echo", "prompt": "x", "temperature": float("inf")}, "temperature"),
])
async def test_unencodable_input_is_a_400_naming_the_field(stack, path, body, param):
    await stack.worker()
    gw = await stack.gateway()
    data = json.dumps(body).encode()  # json escapes the surrogate as \\ud800, as a client would
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post(path, content=data, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param.encode("utf-8", "backslashreplace").decode()
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/batches/queue:health-check"), ("GET", "/v1/batches/batch_../../x"), ("POST", "/v1/batches/x/cancel"),
    ("GET", "/v1/files/queue"), ("GET", "/v1/files/x/content"), ("DELETE", "/v1/files/file-x"),
    ("POST", "/v1/requests/chatcmpl-a:b/cancel"), ("GET", "/v1/streams/cmpl-"),
])
async def test_ids_are_checked_by_shape_before_they_touch_a_key(stack, redis, method, path):
    await redis.set("redserve:batch:queue:health-check", "not a batch")  # what the attack read with WRONGTYPE
    gw = await stack.gateway()
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.request(method, path)
    assert r.status_code == 404, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_file_quotas_per_tenant(stack):
    gw = await stack.gateway(api_keys=["sk-a", "sk-b"], tenant_max_files=2, tenant_max_bytes=10_000)
    a = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="sk-a", max_retries=0)
    b = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="sk-b", max_retries=0)
    first = await a.files.create(file=("1.jsonl", b"x" * 100), purpose="batch")
    await a.files.create(file=("2.jsonl", b"x" * 100), purpose="batch")
    with pytest.raises(openai.BadRequestError) as exc:
        await a.files.create(file=("3.jsonl", b"x" * 100), purpose="batch")
    assert exc.value.body["code"] == "quota_exceeded" and "tenant_max_files" in exc.value.body["message"]
    await b.files.create(file=("b.jsonl", b"x" * 100), purpose="batch")  # another tenant has its own quota
    assert (await a.files.delete(first.id)).deleted
    with pytest.raises(openai.BadRequestError) as exc:  # a file back, but the bytes would pass the quota
        await a.files.create(file=("big.jsonl", b"x" * 9_950), purpose="batch")
    assert "tenant_max_bytes" in exc.value.body["message"]
    await a.files.create(file=("ok.jsonl", b"x" * 9_000), purpose="batch")


async def test_without_keys_files_are_counted_not_refused(stack):
    """A server without API keys has no tenants to hold apart: the per-tenant quota does not apply."""
    gw = await stack.gateway(tenant_max_files=2)
    client = gw.client()
    for i in range(3):
        await client.files.create(file=(f"{i}.jsonl", b"{}"), purpose="batch")


async def test_a_deep_body_is_a_400(stack):
    gw = await stack.gateway()
    deep = "[" * 500 + "]" * 500  # json.loads takes it; the check walks it without recursion and stops at 32
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", headers={"content-type": "application/json"},
                            content=b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "stop": '
                                    + deep.encode() + b"}")
    assert r.status_code == 400 and "nests deeper" in r.json()["error"]["message"]


async def test_votes_are_trimmed(stack, redis):
    gw = await stack.gateway(votes_max_entries=10)
    vote = {"winner": "tie", "left_model": "a", "right_model": "b", "prompt": "p"}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        for _ in range(25):
            assert (await http.post("/api/votes", json=vote)).status_code == 201
    assert await redis.xlen("redserve:votes") == 10
