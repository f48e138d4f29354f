"""The OpenAI Batch API on the gateway, driven by the official openai client: files.create, batches.create,
batches.retrieve, files.content; bad lines into the error file, a malformed file failing validation, cancel."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from batchkit import jsonl, lines, running_runner

from workers.echo import echo_tokens


async def _run(client: openai.AsyncOpenAI, content: bytes, endpoint: str = "/v1/chat/completions",
               timeout: float = 30.0):  # noqa: ANN202
    uploaded = await client.files.create(file=("requests.jsonl", content), purpose="batch")
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert loop.time() < end, batch
        await asyncio.sleep(0.05)
        batch = await client.batches.retrieve(batch.id)
    return uploaded, batch


async def test_batch_end_to_end(stack, settings):
    await stack.worker(["echo"])
    gw = await stack.gateway()
    client = gw.client()
    async with running_runner(settings):
        uploaded, batch = await _run(client, lines(25, max_tokens=3))
    assert uploaded.purpose == "batch" and uploaded.bytes == len(lines(25, max_tokens=3))
    assert (await client.files.retrieve(uploaded.id)).filename == "requests.jsonl"
    assert (await client.files.content(uploaded.id)).content == lines(25, max_tokens=3)
    assert batch.status == "completed" and batch.error_file_id is None and batch.errors is None
    assert batch.request_counts.total == 25 and batch.request_counts.completed == 25
    assert batch.request_counts.failed == 0
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.usage.output_tokens == 75
    out = jsonl((await client.files.content(batch.output_file_id)).content)
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(25)]
    for i, o in enumerate(out):
        assert o["error"] is None and o["response"]["status_code"] == 200
        body = o["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == "".join(echo_tokens(f"req number {i}", 3))
    listed = await client.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id]


async def test_completions_batch(stack, settings):
    await stack.worker(["echo"])
    client = (await stack.gateway()).client()
    rows = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "echo", "prompt": f"complete {i}", "max_tokens": 2, "echo": True}} for i in range(5)]
    async with running_runner(settings):
        _, batch = await _run(client, "\n".join(map(json.dumps, rows)).encode(), endpoint="/v1/completions")
    out = jsonl((await client.files.content(batch.output_file_id)).content)
    assert [o["response"]["body"]["choices"][0]["text"] for o in out] == \
        [f"complete {i}" + "".join(echo_tokens(f"complete {i}", 2)) for i in range(5)]


async def test_bad_lines_go_to_the_error_file(stack, settings):
    await stack.worker(["echo"])
    client = (await stack.gateway()).client()
    good = {"model": "echo", "messages": [{"role": "user", "content": "fine"}], "max_tokens": 1}
    rows = [
        {"custom_id": "ok-1", "method": "POST", "url": "/v1/chat/completions", "body": good},
        {"custom_id": "unknown-arg", "method": "POST", "url": "/v1/chat/completions", "body": {**good, "bogus": 1}},
        {"custom_id": "no-model", "method": "POST", "url": "/v1/chat/completions",
         "body": {**good, "model": "missing"}},
        {"custom_id": "wrong-url", "method": "POST", "url": "/v1/completions",
         "body": {"model": "echo", "prompt": "x"}},
        {"custom_id": "get", "method": "GET", "url": "/v1/chat/completions", "body": good},
        {"custom_id": "streamed", "method": "POST", "url": "/v1/chat/completions", "body": {**good, "stream": True}},
        {"custom_id": "ok-2", "method": "POST", "url": "/v1/chat/completions", "body": good},
    ]
    async with running_runner(settings):
        _, batch = await _run(client, "\n".join(map(json.dumps, rows)).encode())
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 2, 5)
    out = jsonl((await client.files.content(batch.output_file_id)).content)
    errors = {e["custom_id"]: e for e in jsonl((await client.files.content(batch.error_file_id)).content)}
    assert [o["custom_id"] for o in out] == ["ok-1", "ok-2"]
    assert list(errors) == ["unknown-arg", "no-model", "wrong-url", "get", "streamed"]
    assert errors["unknown-arg"]["response"]["status_code"] == 400  # exactly what the endpoint answers
    assert "bogus" in errors["unknown-arg"]["response"]["body"]["error"]["message"]
    assert errors["no-model"]["response"]["status_code"] == 404
    for cid in ("wrong-url", "get", "streamed"):  # never sent: no response, an error saying why
        assert errors[cid]["response"] is None and errors[cid]["error"]["code"] == "invalid_request"
    assert "does not match" in errors["wrong-url"]["error"]["message"]


async def test_malformed_file_fails_validation(stack, settings):
    await stack.worker(["echo"])
    client = (await stack.gateway()).client()
    content = lines(2) + b"this is not json\n" + lines(1) + b'["a list"]\n'
    async with running_runner(settings):
        _, batch = await _run(client, content)
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    found = [(e.code, e.line) for e in batch.errors.data]
    assert found == [("invalid_json_line", 3), ("duplicate_custom_id", 4), ("invalid_request", 5)], found
    assert batch.errors.data[0].message.startswith("Line 3 is not valid JSON")
    assert "req-0" in batch.errors.data[1].message


async def test_cancel_a_running_batch(stack, settings):
    await stack.worker(["echo"], max_concurrency=2, echo_delay=0.05, echo_tokens=4)
    client = (await stack.gateway()).client()
    async with running_runner(settings):
        uploaded = await client.files.create(file=("r.jsonl", lines(60)), purpose="batch")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        while (batch := await client.batches.retrieve(batch.id)).request_counts.completed < 3:
            await asyncio.sleep(0.05)
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
        while batch.status == "cancelling" or batch.status == "in_progress":
            await asyncio.sleep(0.05)
            batch = await client.batches.retrieve(batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    done = batch.request_counts.completed
    assert 3 <= done < 60 and batch.request_counts.failed == 0
    out = jsonl((await client.files.content(batch.output_file_id)).content)
    assert len(out) == done == len({o["custom_id"] for o in out})
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(batch.id)


async def test_refusals_are_openai_errors(stack):
    client = (await stack.gateway()).client()
    with pytest.raises(openai.BadRequestError) as wrong_purpose:
        await client.files.create(file=("r.jsonl", lines(1)), purpose="fine-tune")
    assert wrong_purpose.value.body["param"] == "purpose"
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve("file-nope")
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                    completion_window="24h")
    uploaded = await client.files.create(file=("r.jsonl", lines(1)), purpose="batch")
    with pytest.raises(openai.BadRequestError) as wrong_endpoint:
        await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h")
    assert wrong_endpoint.value.body["param"] == "endpoint"
