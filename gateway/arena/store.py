"""The arena's state in Redis: battles, their votes, the leaderboard's running state and reply feedback.

A battle is one TTL'd hash whose values a person reads (both models, each
side's conversation as JSON, its state); its vote is cast by ``vote.lua``,
which refuses a second one and appends the vote to a stream in the same step.
The leaderboard is folded from that stream incrementally: the running
``Tally`` and the id of the last vote folded live in one hash, so a page load
reads new votes only, and one gateway at a time folds (a short lock; the
others read the state as it stands). See docs/redis.md.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from broker.connection import atomic_pipeline, execute, resolved
from broker.errors import ServeError
from broker.keys import Keys
from broker.scripts import Scripts
from gateway.arena.ratings import Tally

#: Votes read per round trip while folding.
FOLD_PAGE = 1_000
#: How long one gateway may hold the fold lock (ms): far more than a fold of FOLD_PAGE votes takes.
FOLD_LOCK_MS = 10_000
#: The longest a battle turn holds its battle (ms), should its gateway die before releasing it.
TURN_MS = 600_000
SIDES = ("a", "b")


@dataclass
class Battle:
    """One anonymous battle as stored: the names stay here until its vote is cast."""

    id: str
    model_a: str
    model_b: str
    owner: str
    state: str = "open"  # open, voted, or ended (a side failed)
    flagged: bool = False
    messages: dict[str, list[dict[str, str]]] = field(default_factory=lambda: {"a": [], "b": []})
    winner: str = ""
    error: str = ""

    def model(self, side: str) -> str:
        return self.model_a if side == "a" else self.model_b

    def to_fields(self) -> dict[str, str]:
        return {"model_a": self.model_a, "model_b": self.model_b, "owner": self.owner, "state": self.state,
                "flagged": "1" if self.flagged else "0", "winner": self.winner, "error": self.error,
                "messages_a": json.dumps(self.messages["a"]), "messages_b": json.dumps(self.messages["b"])}

    @classmethod
    def from_fields(cls, battle_id: str, f: dict[str, str]) -> Battle:
        return cls(battle_id, f["model_a"], f["model_b"], f.get("owner", ""), f.get("state", "open"),
                   f.get("flagged") == "1", {s: json.loads(f.get(f"messages_{s}") or "[]") for s in SIDES},
                   f.get("winner", ""), f.get("error", ""))

    def public(self) -> dict[str, Any]:
        """What the browser may know: the names only once the vote is stored."""
        shown: dict[str, Any] = {"id": self.id, "state": self.state, "flagged": self.flagged,
                                 "messages": self.messages, "winner": self.winner or None}
        if self.state == "voted":
            shown["models"] = {"a": self.model_a, "b": self.model_b}
        return shown


class ArenaStore:
    """Battles, votes, leaderboard state and feedback, on one text (decoded) Redis client."""

    def __init__(self, redis: Redis, keys: Keys, *, battle_ttl: float, max_entries: int) -> None:
        self.redis = redis
        self.keys = keys
        self.battle_ttl_ms = int(battle_ttl * 1000)
        self.max_entries = max_entries
        self.scripts = Scripts.register(redis)

    # --- battles -------------------------------------------------------------
    async def create(self, models: Sequence[str], owner: str, rng: random.Random) -> Battle:
        """A new battle between two of ``models``, drawn toward the pairs with fewest votes."""
        tally = await self.tally()
        a, b = draw_pair(models, tally, rng)
        battle = Battle(uuid.uuid4().hex, a, b, owner)
        await self.save(battle)
        return battle

    async def get(self, battle_id: str) -> Battle | None:
        fields = await resolved(self.redis.hgetall(self.keys.battle(battle_id)))
        return Battle.from_fields(battle_id, fields) if fields else None

    async def save(self, battle: Battle) -> None:
        key = self.keys.battle(battle.id)
        async with atomic_pipeline(self.redis) as pipe:
            pipe.hset(key, mapping=battle.to_fields())  # type: ignore[arg-type]  # redis-py's mapping type is invariant
            pipe.pexpire(key, self.battle_ttl_ms)
            await execute(pipe)

    async def begin_turn(self, battle_id: str) -> None:
        """Hold the battle for one turn (a 409 if a turn is under way): until ``end_turn``, no other turn and no
        vote. The marker expires by itself if this gateway dies mid-turn."""
        if not await self.redis.set(self.keys.battle_turn(battle_id), "1", nx=True, px=TURN_MS):
            raise ServeError("A turn of this battle is still under way.", status=409, code="battle_busy",
                             param="battle")

    async def end_turn(self, battle: Battle, *, ended: bool) -> None:
        """Store the turn's conversation (and the end of the battle, if a side failed), then release it. Only
        these fields are written: whatever else the battle holds is left as it is."""
        key = self.keys.battle(battle.id)
        fields = {f"messages_{s}": json.dumps(battle.messages[s]) for s in SIDES}
        if ended:
            fields |= {"state": "ended", "error": battle.error}
        async with atomic_pipeline(self.redis) as pipe:
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # redis-py's mapping type is invariant
            pipe.pexpire(key, self.battle_ttl_ms)
            pipe.delete(self.keys.battle_turn(battle.id))
            await execute(pipe)

    async def flag(self, battle_id: str) -> None:
        """Moderation refused a prompt of this battle: it stays, but its vote will not count."""
        await resolved(self.redis.hset(self.keys.battle(battle_id), "flagged", "1"))

    async def vote(self, battle_id: str, winner: str) -> tuple[str, str]:
        """Cast the battle's one vote; the two names it reveals. Refusals are 409 (404 when it is gone)."""
        try:
            a, b, _ = await self.scripts.vote(
                keys=[self.keys.battle(battle_id), self.keys.arena_votes(), self.keys.battle_turn(battle_id)],
                args=[winner, battle_id, self.max_entries, self.battle_ttl_ms])
        except ResponseError as exc:
            word, _, message = str(exc).partition(" ")
            status = 404 if word == "GONE" else 409
            raise ServeError(f"Cannot vote: {message}.", status=status, code=f"battle_{word.lower()}",
                             param="battle") from None
        return a, b

    # --- the leaderboard ---------------------------------------------------------
    async def tally(self) -> Tally:
        """The leaderboard's state with every vote folded in (or, while another gateway folds, as it stands)."""
        if await self.redis.set(self.keys.leaderboard_lock(), "1", nx=True, px=FOLD_LOCK_MS):
            try:
                return await self._fold()
            finally:
                await self.redis.delete(self.keys.leaderboard_lock())
        return Tally.from_fields(await resolved(self.redis.hgetall(self.keys.leaderboard())))

    async def recompute(self) -> Tally:
        """Forget the running state and fold every vote in the stream again."""
        await self.redis.delete(self.keys.leaderboard())
        return await self.tally()

    async def _fold(self) -> Tally:
        state = await resolved(self.redis.hgetall(self.keys.leaderboard()))
        tally, last = Tally.from_fields(state), state.get("last_id", "0-0")
        while True:
            entries = await self.redis.xrange(self.keys.arena_votes(), min=f"({last}", count=FOLD_PAGE)
            if not entries:
                return tally
            for entry_id, vote in entries:
                last = entry_id
                if vote.get("flagged") != "1":
                    tally.add(vote["model_a"], vote["model_b"], vote["winner"])
            await resolved(self.redis.hset(self.keys.leaderboard(), mapping={**tally.to_fields(), "last_id": last}))

    # --- feedback ----------------------------------------------------------------
    async def add_feedback(self, fields: dict[str, str]) -> str:
        entry: dict[Any, Any] = {**fields, "at": f"{time.time():.3f}"}  # redis-py's field type is invariant
        entry_id: str = await self.redis.xadd(self.keys.feedback(), entry, maxlen=self.max_entries, approximate=True)
        return entry_id


def draw_pair(models: Sequence[str], tally: Tally, rng: random.Random) -> tuple[str, str]:
    """Two different models, each pair weighted by 1 / (1 + its votes) so the thinnest pairs fill first, in a
    random left/right order."""
    names = sorted(set(models))
    if len(names) < 2:
        raise ServeError(f"The arena needs at least two live models; {len(names)} serving now.",  # never a name
                         status=503, code="arena_unavailable")
    pairs = [(x, y) for i, x in enumerate(names) for y in names[i + 1:]]
    weights = [1.0 / (1 + sum(tally.pairs.get(p, (0, 0, 0))) + sum(tally.pairs.get(p[::-1], (0, 0, 0))))
               for p in pairs]
    a, b = rng.choices(pairs, weights)[0]
    return (a, b) if rng.random() < 0.5 else (b, a)
