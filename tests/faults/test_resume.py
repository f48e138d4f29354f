"""Resumable streams: a client that drops and reconnects with Last-Event-ID gets the rest, exactly once."""

from __future__ import annotations

import asyncio
import json

import httpx
from support import sse_events, wait_for

from workers.echo import echo_tokens

BODY = {"model": "echo", "messages": [{"role": "user", "content": "resume me please"}], "stream": True,
        "stream_options": {"include_usage": True, "resumable": True}}


async def read_events(response: httpx.Response, limit: int | None = None) -> list[tuple[str | None, str]]:
    """(id, data) of each SSE event, stopping after ``limit`` content chunks."""
    events, content = [], 0
    async for eid, data in sse_events(response):
        events.append((eid, data))
        if data != "[DONE]" and (json.loads(data).get("choices") or [{}])[0].get("delta", {}).get("content"):
            content += 1
            if limit is not None and content >= limit:
                break
    return events


def text(events: list[tuple[str | None, str]]) -> str:
    out = ""
    for _, data in events:
        if data != "[DONE]":
            for choice in json.loads(data).get("choices") or []:
                out += choice["delta"].get("content") or ""
    return out


async def test_resume_after_a_dropped_connection_on_another_gateway(stack, outcome):
    w = await stack.worker(worker_id="w", echo_delay=0.05, echo_tokens=30)
    first_gw, second_gw = await stack.gateway(), await stack.gateway()
    async with httpx.AsyncClient(base_url=first_gw.url, timeout=10) as http:
        async with http.stream("POST", "/v1/chat/completions", json=BODY) as r:
            before = await read_events(r, limit=5)  # then the connection drops
    last_id = [eid for eid, _ in before if eid][-1]
    response_id = json.loads(before[0][1])["id"]
    await asyncio.sleep(0.4)  # generation goes on meanwhile
    assert w.tasks, "a resumable stream keeps generating after its client dropped"
    async with httpx.AsyncClient(base_url=second_gw.url, timeout=10) as http:
        async with http.stream("GET", f"/v1/streams/{response_id}", headers={"Last-Event-ID": last_id}) as r:
            assert r.status_code == 200
            after = await read_events(r)
        whole = await http.get(f"/v1/streams/{response_id}")  # no Last-Event-ID: the whole stream again
    assert text(before) + text(after) == "".join(echo_tokens("resume me please", 30))  # no loss, no duplicate
    assert after[-1][1] == "[DONE]" and json.loads(after[-2][1])["usage"]["completion_tokens"] == 30
    ids = [eid for eid, _ in before + after if eid]
    assert len(ids) == len(set(ids))
    assert text([event async for event in sse_events(whole)]) == "".join(echo_tokens("resume me please", 30))
    outcome.requests, outcome.ok = 1, 1


async def test_unknown_or_plain_streams_cannot_be_resumed(stack):
    await stack.worker()
    gw = await stack.gateway()
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        r = await http.get("/v1/streams/chatcmpl-nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "stream_not_found"
        plain = {**BODY, "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/chat/completions", json=plain) as s:
            events = await read_events(s)
        r = await http.get(f"/v1/streams/{json.loads(events[0][1])['id']}")
        assert r.status_code == 404  # only streams that asked to be resumable keep a replay log
        r = await http.get("/v1/streams/chatcmpl-x", headers={"Last-Event-ID": "garbage"})
        assert r.status_code in (400, 404)


async def test_disconnect_without_resumable_still_cancels(stack):
    w = await stack.worker(worker_id="w", echo_delay=0.05, echo_tokens=100)
    gw = await stack.gateway()
    plain = {**BODY, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        async with http.stream("POST", "/v1/chat/completions", json=plain) as r:
            await read_events(r, limit=3)
    await wait_for(lambda: not w.tasks, timeout=2)
