"""The web UI's own JSON endpoints, beside the OpenAI API: the fleet table and side-by-side votes.

Both stay stateless like the rest of the gateway: the fleet is read from the
worker records on every call (so a worker vanishes as soon as its key
expires), and a vote is one entry appended to a Redis stream a person reads
with ``redis-cli`` (see docs/redis.md). Tokens per second are left to the
client, from the change of ``tokens_out`` between two heartbeats, because a
rate needs a previous sample and a stateless gateway keeps none.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from broker.client import BrokerClient
from broker.registry import WorkerRecord
from gateway.schemas import RequestBody
from gateway.security import tenant_of

router = APIRouter(prefix="/api", tags=["web UI"])

#: Longest text a vote field keeps: a runaway reply must not bloat the stream.
MAX_TEXT = 100_000


class Vote(RequestBody):
    """One judgement of two replies to the same prompt."""

    winner: Literal["left", "right", "tie", "both_bad"]
    left_model: str = Field(min_length=1, max_length=256)
    right_model: str = Field(min_length=1, max_length=256)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    system: str = Field(default="", max_length=MAX_TEXT)
    left_reply: str = Field(default="", max_length=MAX_TEXT)
    right_reply: str = Field(default="", max_length=MAX_TEXT)
    params: dict[str, int | float | str | None] = Field(default_factory=dict, max_length=32)

    def to_fields(self) -> dict[str, str]:
        """Plain strings, so ``XRANGE`` in redis-cli reads like the record it is."""
        fields = self.model_dump(exclude={"params"})
        fields["params"] = json.dumps(self.params, sort_keys=True)
        return fields


def _broker(request: Request) -> BrokerClient:
    return request.app.state.broker


def fleet_row(w: WorkerRecord) -> dict[str, Any]:
    """What the dashboard shows of one worker; counters are raw so the client can take rates."""
    return {
        "id": w.id, "models": w.models, "engine": w.engine, "status": w.status, "queue": w.queue,
        "max_concurrency": w.max_concurrency, "max_queue": w.max_queue, "speed": w.speed, "host": w.host,
        "pid": w.pid, "started_at": w.started_at, "context_length": w.context_length,
        "jobs_done": w.jobs_done, "tokens_out": w.tokens_out, "last_heartbeat": w.last_heartbeat,
    }


@router.get("/fleet")
async def fleet(request: Request) -> dict[str, Any]:
    """The live workers now, with this gateway's clock so ages do not depend on the browser's."""
    workers = await _broker(request).live_workers()
    rows = [fleet_row(w) for w in sorted(workers, key=lambda w: (w.models, w.id))]
    return {"now": time.time(), "workers": rows}


@router.post("/votes", status_code=201)
async def cast_vote(vote: Vote, request: Request) -> dict[str, str]:
    """Append a vote to the votes stream (trimmed to ``votes_max_entries``); the entry id (its time) comes back."""
    broker = _broker(request)
    fields = {**vote.to_fields(), "tenant": tenant_of(request).id}
    return {"id": await broker.add_vote(fields, broker.settings.votes_max_entries)}
