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

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from broker.client import BrokerClient
from broker.errors import WorkerTimeout
from broker.ids import request_id
from broker.replay import Replay
from gateway.errors import APIError
from gateway.security import tenant_of
from gateway.sse import PING, EventId, StreamFormat, encode, failure, opening, render, response

router = APIRouter()


@router.get("/v1/streams/{response_id}")
async def resume_stream(response_id: str, request: Request) -> EventSourceResponse:
    broker: BrokerClient = request.app.state.broker
    rid = request_id(response_id)
    log = await broker.replay_log(rid) if rid else None
    if log is None or not tenant_of(request).owns(log.owner):  # another tenant's stream reads as absent
        raise APIError(404, f"No resumable stream `{response_id}` (unknown, not streamed, or its replay window "
                            "has passed).", param="id", code="stream_not_found")
    fmt = StreamFormat.from_meta(log.meta, response_id)
    last = EventId.parse(request.headers.get("last-event-id") or request.query_params.get("last_event_id"))
    events = _replay(broker, log, fmt, last)
    return response(events, broker.settings.send_timeout)  # _replay sends its own keep-alive


async def _replay(broker: BrokerClient, log: Replay, fmt: StreamFormat, last: EventId | None
                  ) -> AsyncIterator[bytes]:
    if last is None and (head := opening(fmt)):
        yield encode(head)
    replies = log.replies
    attempt = last.attempt if last else max((r.attempt for r in replies), default=0)
    quiet_since = pinged = time.monotonic()
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
        replies = await broker.follow_replay(log, block_ms=1000)
        if replies:
            quiet_since = pinged = time.monotonic()
        elif time.monotonic() - pinged >= broker.settings.keepalive:
            yield PING
            pinged = time.monotonic()
        if not replies and time.monotonic() - quiet_since > broker.settings.reply_timeout:
            exc = WorkerTimeout(f"The stream got no new message within {broker.settings.reply_timeout:g} s.")
            yield encode(failure(exc.body()))
            return
