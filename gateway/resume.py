"""Resuming a stream: ``GET /v1/streams/{id}`` with ``Last-Event-ID`` replays what the client missed.

Pub/sub cannot replay, so a streaming job's worker also appends each reply
message to a short-lived per-request log (in the same Redis command as the
publish). Any gateway can serve the resume: it renders the log exactly as
the live stream did (same event ids), skips what the client already has,
then follows the log until the stream ends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from broker.client import BrokerClient
from broker.errors import WorkerTimeout
from broker.protocol import Reply, unpack
from gateway.errors import APIError
from gateway.generation import request_id
from gateway.security import tenant_of
from gateway.sse import EventId, StreamFormat, encode, failure, opening, render

router = APIRouter()


@router.get("/v1/streams/{response_id}")
async def resume_stream(response_id: str, request: Request) -> EventSourceResponse:
    broker: BrokerClient = request.app.state.broker
    rid = request_id(response_id)
    key = broker.keys.replay(rid) if rid else ""
    entries = await broker.raw.xrange(key) if rid else []
    head = entries[0][1] if entries else {}
    owner = head.get(b"owner", b"").decode() if b"meta" in head else None
    if not tenant_of(request).owns(owner):  # another tenant's stream reads as absent
        raise APIError(404, f"No resumable stream `{response_id}` (unknown, not streamed, or its replay window "
                            "has passed).", param="id", code="stream_not_found")
    fmt = StreamFormat.from_meta(unpack(entries[0][1][b"meta"]), response_id)
    last = EventId.parse(request.headers.get("last-event-id") or request.query_params.get("last_event_id"))
    events = _replay(broker, key, fmt, entries[1:], last)
    return EventSourceResponse(events, ping=15, send_timeout=broker.settings.send_timeout,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _replay(broker: BrokerClient, key: str, fmt: StreamFormat, entries: list[Any], last: EventId | None
                  ) -> AsyncIterator[bytes]:
    if last is None and (head := opening(fmt)):
        yield encode(head)
    cursor = entries[-1][0] if entries else "0-0"
    replies = [Reply.decode(fields[b"r"]) for _, fields in entries]
    attempt = last.attempt if last else max((r.attempt for r in replies), default=0)
    quiet_since = time.monotonic()
    while True:
        for reply in replies:
            if reply.attempt != attempt or (last is not None and reply.seq < last.seq):
                continue
            sse, ended = render(fmt, reply.events, reply.attempt, reply.seq)
            if last is not None and reply.seq == last.seq:
                sse = sse[last.chunk + 1:]
            if sse:
                yield encode(sse)
            if ended:
                return
        more = await broker.raw.xread({key: cursor}, count=1000, block=1000)
        if not more:
            if time.monotonic() - quiet_since > broker.settings.reply_timeout:
                exc = WorkerTimeout(f"The stream got no new message within {broker.settings.reply_timeout:g} s.")
                yield encode(failure(exc.body()))
                return
            replies = []
            continue
        new = more[0][1]
        cursor = new[-1][0]
        replies = [Reply.decode(fields[b"r"]) for _, fields in new]
        quiet_since = time.monotonic()
