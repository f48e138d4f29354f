"""API keys are tenants: one key never sees, changes or cancels another's files, batches, requests or streams.

Each test plays the attack from the security issue with the official openai client: keyA owns things,
keyB tries every route on them and gets what a stranger gets (404, an empty list), never keyA's data.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from batchkit import lines, running_runner
from faults.faultkit import stream_chat
from support import sse_events

from broker.keys import Keys
from broker.tenants import tenant_id

KEY_A, KEY_B, ADMIN = "sk-tenant-a", "sk-tenant-b", "sk-operator"


def client(gw, key: str) -> openai.AsyncOpenAI:  # noqa: ANN001
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


async def _finished_batch(a: openai.AsyncOpenAI, content: bytes):  # noqa: ANN202
    uploaded = await a.files.create(file=("mine.jsonl", content), purpose="batch")
    batch = await a.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    for _ in range(600):
        batch = await a.batches.retrieve(batch.id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            break
        await asyncio.sleep(0.05)
    return uploaded, batch


async def test_files_and_batches_belong_to_their_key(stack, settings):
    await stack.worker()
    gw = await stack.gateway(api_keys=[KEY_A, KEY_B], admin_api_keys=[ADMIN])
    a, b, admin = client(gw, KEY_A), client(gw, KEY_B), client(gw, ADMIN)
    async with running_runner(settings):
        uploaded, batch = await _finished_batch(a, lines(3, max_tokens=2, prefix="secret-of-a"))
    assert batch.status == "completed" and batch.output_file_id
    # The output file's id is random: nothing about it follows from the batch id.
    assert batch.id.removeprefix("batch_") not in batch.output_file_id

    for call in (lambda: b.batches.retrieve(batch.id), lambda: b.batches.cancel(batch.id),
                 lambda: b.files.retrieve(uploaded.id), lambda: b.files.content(uploaded.id),
                 lambda: b.files.content(batch.output_file_id), lambda: b.files.delete(uploaded.id),
                 lambda: b.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")):
        with pytest.raises(openai.NotFoundError):  # 404, as for a thing that does not exist: nothing confirmed
            await call()
    assert (await b.batches.list()).data == []
    with pytest.raises(openai.NotFoundError):
        await b.batches.list(after=batch.id)

    # The owner and an operator still see it all, and B's attempts changed nothing.
    assert (await a.batches.retrieve(batch.id)).status == "completed"
    assert b"secret-of-a" in (await a.files.content(batch.output_file_id)).content
    assert [x.id for x in (await a.batches.list()).data] == [batch.id]
    assert [x.id for x in (await admin.batches.list()).data] == [batch.id]
    assert (await admin.files.retrieve(uploaded.id)).id == uploaded.id


async def test_cancel_and_resume_belong_to_their_key(stack):
    await stack.worker(echo_delay=0.05, echo_tokens=40)
    gw = await stack.gateway(api_keys=[KEY_A, KEY_B], admin_api_keys=[ADMIN])
    body = {"model": "echo", "messages": [{"role": "user", "content": "only for a " * 20}], "max_tokens": 40,
            "stream": True, "stream_options": {"resumable": True}}
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {KEY_A}"}) as r:
            assert r.status_code == 200
            events = sse_events(r)
            async for _, data in events:
                rid = json.loads(data)["id"]
                break
            as_b = {"Authorization": f"Bearer {KEY_B}"}
            cancel = await http.post(f"/v1/requests/{rid}/cancel", headers=as_b)
            assert cancel.status_code == 404 and cancel.json()["error"]["code"] == "request_not_found"
            resume = await http.get(f"/v1/streams/{rid}", headers=as_b)
            assert resume.status_code == 404 and resume.json()["error"]["code"] == "stream_not_found"
            rest = [data async for _, data in events]
    # A's stream was not cancelled by B's attempt: it ran to its end.
    chunks = [json.loads(x) for x in rest if x != "[DONE]"]
    assert "[DONE]" in rest and not any("error" in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] in ("stop", "length")
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        mine = await http.get(f"/v1/streams/{rid}", headers={"Authorization": f"Bearer {KEY_A}"})
        assert mine.status_code == 200 and "finish_reason" in mine.text and "[DONE]" in mine.text
        ops = await http.get(f"/v1/streams/{rid}", headers={"Authorization": f"Bearer {ADMIN}"})
        assert ops.status_code == 200


async def test_owner_and_admin_may_cancel(stack, redis):
    await stack.worker(echo_delay=0.05, echo_tokens=200)
    gw = await stack.gateway(api_keys=[KEY_A, KEY_B], admin_api_keys=[ADMIN])
    for canceller in (KEY_A, ADMIN):
        task = asyncio.create_task(stream_chat(gw.url, "cancel me " * 50, max_tokens=200,
                                               headers={"Authorization": f"Bearer {KEY_A}"}))
        rid = None
        while rid is None:
            await asyncio.sleep(0.05)
            ids = [k async for k in redis.scan_iter("redserve:{*}:request:*")]
            if ids:
                rid = ids[0].rsplit(":", 1)[1]
        assert await redis.hget(Keys().request(rid), "owner") == tenant_id(KEY_A.encode())
        async with httpx.AsyncClient(base_url=gw.url) as http:
            r = await http.post(f"/v1/requests/chatcmpl-{rid}/cancel", headers={"Authorization": f"Bearer {canceller}"})
        assert r.status_code == 200, r.text
        res = await task
        assert res.error is not None and res.error["code"] == "cancelled"
        await redis.delete(Keys().request(rid))


async def test_without_keys_everything_is_shared_as_before(stack, settings):
    await stack.worker()
    gw = await stack.gateway()
    anyone = gw.client()
    async with running_runner(settings):
        uploaded, batch = await _finished_batch(anyone, lines(2, max_tokens=2))
    assert batch.status == "completed"
    assert [x.id for x in (await gw.client().batches.list()).data] == [batch.id]
    assert (await gw.client().files.content(uploaded.id)).content == lines(2, max_tokens=2)


async def test_an_opened_path_grants_no_tenant_rights(stack, settings):
    """A route opened with open_paths is reachable without a key, as a tenant that owns and sees nothing."""
    await stack.worker()
    gw = await stack.gateway(api_keys=[KEY_A], open_paths=["/health", "/v1/batches"])
    async with running_runner(settings):
        _, batch = await _finished_batch(client(gw, KEY_A), lines(1, max_tokens=1))
    async with httpx.AsyncClient(base_url=gw.url) as http:
        listed = await http.get("/v1/batches")
    assert listed.status_code == 200 and listed.json()["data"] == []
    assert batch.id not in listed.text
