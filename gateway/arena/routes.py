"""The arena's HTTP endpoints: anonymous battles, their votes, the leaderboard and reply feedback.

A battle's two sides are plain chat jobs through the broker, run side by side
and streamed back as one SSE stream of ``{"side": "a"|"b", ...}`` events. The
browser only ever sees ``model_a`` and ``model_b``: no event, body, header or
error names a model until the vote is stored (a side's error message has the
names replaced). A side that fails ends the battle without a vote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi import APIRouter, FastAPI, Request
from pydantic import Field, ValidationError
from sse_starlette.sse import EventSourceResponse

from broker.client import BrokerClient
from broker.connection import connect
from broker.errors import ServeError
from broker.protocol import ChoiceEnd, Delta, Done, Failure, JobKind
from broker.replies import Restarted
from broker.settings import Settings
from broker.tenants import well_formed
from gateway import limits
from gateway.arena.ratings import leaderboard, win_fractions
from gateway.arena.store import SIDES, ArenaStore, Battle
from gateway.errors import APIError
from gateway.generation import reserve_tokens, submit
from gateway.schemas import ChatCompletionRequest, RequestBody
from gateway.security import tenant_of

log = logging.getLogger(__name__)

#: Longest text a feedback entry keeps of one message.
MAX_TEXT = 100_000
#: Bootstrap rounds behind the leaderboard's confidence intervals.
BOOTSTRAP_ROUNDS = 200


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    redis = connect(app.state.redis_url, decode=True)
    app.state.arena = ArenaStore(redis, app.state.broker.keys, battle_ttl=settings.arena_battle_ttl,
                                 max_entries=settings.votes_max_entries)
    app.state.arena_rng = random.Random()
    try:
        yield
    finally:
        await redis.aclose()


router = APIRouter(prefix="/api", tags=["arena"], lifespan=_lifespan)


class Regenerate(RequestBody):
    """The sampling both sides use (the last user message is answered again)."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)


class Turn(Regenerate):
    """The next user message of a battle, and the sampling both sides use."""

    content: str = Field(min_length=1, max_length=MAX_TEXT)


class BattleVote(RequestBody):
    winner: Literal["a", "b", "tie", "both_bad"]


class Feedback(RequestBody):
    """A judgement of one reply in single chat, with the conversation it belongs to."""

    model: str = Field(min_length=1, max_length=256)
    rating: Literal["up", "down", "flag"]
    messages: list[dict[str, str]] = Field(min_length=1, max_length=512)
    reply: str = Field(max_length=MAX_TEXT)
    note: str = Field(default="", max_length=2_000)


def _store(request: Request) -> ArenaStore:
    return request.app.state.arena


def _broker(request: Request) -> BrokerClient:
    return request.app.state.broker


async def _owned(request: Request, battle_id: str) -> Battle:
    battle = await _store(request).get(battle_id) if well_formed("battle", battle_id) else None
    if battle is None or not tenant_of(request).owns(battle.owner):
        raise APIError(404, f"No battle `{battle_id}` (it may have expired).", param="battle",
                       code="battle_not_found")
    return battle


# --- battles ---------------------------------------------------------------------
@router.post("/arena/battles", status_code=201)
async def new_battle(request: Request) -> dict[str, Any]:
    """Draw two different live models for a new battle; the answer names neither."""
    settings: Settings = request.app.state.settings
    live = {m for w in await _broker(request).live_workers() if w.status == "ready" for m in w.models}
    if settings.arena_models:
        live &= set(settings.arena_models)
    live -= set(settings.arena_exclude)
    battle = await _store(request).create(sorted(live), tenant_of(request).id, request.app.state.arena_rng)
    return battle.public()


@router.get("/arena/battles/{battle_id}")
async def get_battle(battle_id: str, request: Request) -> dict[str, Any]:
    return (await _owned(request, battle_id)).public()


@router.post("/arena/battles/{battle_id}/turns")
async def battle_turn(battle_id: str, turn: Turn, request: Request) -> EventSourceResponse:
    """Send the next user message to both sides; their replies stream back side by side."""
    battle = await _playable(request, battle_id)
    if (moderator := request.app.state.moderator) is not None:
        try:
            await moderator.screen([turn.content], "content")
        except ServeError as exc:
            if exc.code == "content_filter":  # kept, but left out of the leaderboard
                await _store(request).flag(battle.id)
            raise
    for side in SIDES:
        battle.messages[side].append({"role": "user", "content": turn.content})
    return await _replies(request, battle, turn.model_dump(exclude={"content"}, exclude_none=True))


@router.post("/arena/battles/{battle_id}/regenerate")
async def battle_regenerate(battle_id: str, body: Regenerate, request: Request) -> EventSourceResponse:
    """Answer the last user message again, on both sides."""
    battle = await _playable(request, battle_id)
    for side in SIDES:
        messages = battle.messages[side]
        if messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise APIError(400, "Nothing to regenerate: the battle has no turn yet.", param="battle")
    return await _replies(request, battle, body.model_dump(exclude_none=True))


@router.post("/arena/battles/{battle_id}/vote")
async def battle_vote(battle_id: str, vote: BattleVote, request: Request) -> dict[str, Any]:
    """Store the battle's one vote; only then are the two names revealed."""
    battle = await _owned(request, battle_id)
    if not battle.messages["a"]:
        raise APIError(409, "Cannot vote: the battle has no turn yet.", param="battle", code="battle_empty")
    model_a, model_b = await _store(request).vote(battle.id, vote.winner)
    return {"id": battle.id, "winner": vote.winner, "models": {"a": model_a, "b": model_b}}


async def _playable(request: Request, battle_id: str) -> Battle:
    battle = await _owned(request, battle_id)
    if battle.state != "open":
        raise APIError(409, f"The battle is {'voted' if battle.state == 'voted' else 'over'}: start a new one.",
                       param="battle", code=f"battle_{battle.state}")
    return battle


async def _replies(request: Request, battle: Battle, sampling: dict[str, Any]) -> EventSourceResponse:
    """Both sides' replies to the battle's conversation as one SSE stream, then the turn stored. The battle is
    held for the turn: no second turn and no vote until both replies are complete."""
    bodies = {side: _side_body(request, battle, side, sampling) for side in SIDES}
    await _store(request).begin_turn(battle.id)
    return EventSourceResponse(_both(request, battle, bodies), ping=15,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _side_body(request: Request, battle: Battle, side: str, sampling: dict[str, Any]) -> ChatCompletionRequest:
    settings: Settings = request.app.state.settings
    try:
        body = ChatCompletionRequest.model_validate({"model": battle.model(side), "messages": battle.messages[side],
                                                     **sampling})
    except ValidationError as exc:
        raise APIError(400, _scrubbed(battle, str(exc.errors()[0]["msg"])), param="messages") from None
    try:
        limits.check(body, settings)
    except ServeError as exc:
        exc.message = _scrubbed(battle, exc.message)
        raise
    return body


async def _both(request: Request, battle: Battle, bodies: dict[str, ChatCompletionRequest]) -> AsyncIterator[str]:
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    replies: dict[str, str] = {}
    tasks = [asyncio.create_task(_side(request, battle, side, body, events, replies)) for side, body in bodies.items()]
    try:
        ended = 0
        while ended < len(tasks):
            ev = await events.get()
            ended += "end" in ev
            yield json.dumps(ev)
        if len(replies) == len(SIDES):
            for side in SIDES:
                battle.messages[side].append({"role": "assistant", "content": replies[side]})
        else:
            battle.state = "ended"
    finally:  # also when the browser left: both jobs are released (their tasks' own finally), the turn ends
        with anyio.CancelScope(shield=True):
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _store(request).end_turn(battle, ended=battle.state == "ended")
    yield json.dumps({"state": battle.state, "error": battle.error or None})


async def _side(request: Request, battle: Battle, side: str, body: ChatCompletionRequest,
                events: asyncio.Queue[dict[str, Any]], replies: dict[str, str]) -> None:
    """Run one side's chat job, putting its deltas on ``events``; ``replies[side]`` once it finished."""
    broker, limiter = _broker(request), request.app.state.limiter
    text: list[str] = []
    held = None
    try:
        held = await reserve_tokens(request, body)
        stream = await submit(request, broker, body.model, JobKind.CHAT, body.job_params())
    except Exception as exc:
        await limiter.settle(held, 0)  # nothing was generated
        await _side_failed(battle, side, _refusal(battle, side, exc), events)
        return
    try:
        while True:
            batch = await stream.next_events()
            if isinstance(batch, Restarted):  # the worker died before anything was sent: it starts over
                text = []
                await events.put({"side": side, "reset": True})
                continue
            for ev in batch:
                match ev:
                    case Delta(index=0, text=piece) if piece:
                        text.append(piece)
                        await events.put({"side": side, "text": piece})
                    case ChoiceEnd(index=0, finish_reason=reason):
                        await events.put({"side": side, "finish_reason": reason})
                    case Failure():
                        raise ServeError.from_event(ev)
                    case Done(usage=usage):  # (a side that fails or is left keeps its reservation as its charge)
                        await limiter.settle(held, usage.prompt_tokens + usage.completion_tokens)
                        replies[side] = "".join(text)
                        await events.put({"side": side, "end": True})
                        return
    except Exception as exc:
        await _side_failed(battle, side, _refusal(battle, side, exc), events)
    finally:
        await asyncio.shield(broker.release(stream))  # a browser gone mid-turn cancels this task


def _refusal(battle: Battle, side: str, exc: Exception) -> ServeError:
    """What a side's failure says: its own error, or (Redis gone past redis_wait, say) a plain one, so the side
    always ends and the stream never hangs."""
    if isinstance(exc, ServeError):
        return exc
    log.warning("arena side %s of battle %s failed: %r", side, battle.id, exc)
    return ServeError("The model could not answer.")


async def _side_failed(battle: Battle, side: str, exc: ServeError, events: asyncio.Queue[dict[str, Any]]) -> None:
    message = _scrubbed(battle, exc.message)
    battle.error = f"model_{side} failed: {message}"
    await events.put({"side": side, "end": True,
                      "error": {"message": message, "code": exc.code, "type": exc.type}})


def _scrubbed(battle: Battle, text: str) -> str:
    """``text`` with both models' names replaced by the sides' (longest first, so a name inside the other's
    is not half-replaced)."""
    for name, alias in sorted(((battle.model_a, "model_a"), (battle.model_b, "model_b")), key=lambda p: -len(p[0])):
        text = text.replace(name, alias)
    return text


# --- the leaderboard -----------------------------------------------------------------
@router.get("/arena/leaderboard")
async def get_leaderboard(request: Request) -> dict[str, Any]:
    """Bradley–Terry ratings with bootstrap 95% intervals, online Elo, votes and the win-fraction matrix."""
    tally = await _store(request).tally()
    rows = await asyncio.to_thread(leaderboard, tally, BOOTSTRAP_ROUNDS)
    models, matrix = win_fractions(tally, [r.model for r in rows])
    return {"rows": [vars(r) for r in rows], "votes": sum(sum(c) for c in tally.pairs.values()),
            "win_fractions": {"models": models, "matrix": matrix}}


# --- feedback ------------------------------------------------------------------------
@router.post("/feedback", status_code=201)
async def add_feedback(body: Feedback, request: Request) -> dict[str, str]:
    """Up, down or flag on one reply in single chat, stored with its conversation."""
    fields = {"model": body.model, "rating": body.rating, "reply": body.reply, "note": body.note,
              "messages": json.dumps(body.messages)[:MAX_TEXT * 4], "tenant": tenant_of(request).id}
    return {"id": await _store(request).add_feedback(fields)}
