"""``redserve leaderboard`` and ``redserve export``: the arena's table and the logged streams, from a terminal."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

from broker.connection import connect
from broker.keys import Keys
from broker.settings import Settings
from gateway.arena.ratings import Row, leaderboard
from gateway.arena.store import ArenaStore
from gateway.conversations import JSON_FIELDS, entries_as_json
from redserve.flags import add_settings_flags

#: What ``redserve export`` writes: the stream each comes from, and its fields that hold JSON.
EXPORTS = {"conversations": (Keys.conversations, JSON_FIELDS),
           "votes": (Keys.arena_votes, frozenset({"messages_a", "messages_b"})),
           "named-votes": (Keys.votes, frozenset({"params"})),
           "feedback": (Keys.feedback, frozenset({"messages"}))}
PAGE = 1_000


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    lb = sub.add_parser("leaderboard", parents=[common],
                        help="Print the arena's leaderboard: Bradley-Terry ratings with 95% intervals, Elo, votes.")
    lb.add_argument("--recompute", action="store_true",
                    help="Forget the running state and fold every stored vote again.")
    lb.add_argument("--rounds", type=int, default=200, help="Bootstrap rounds behind the intervals [default 200].")
    add_settings_flags(lb, "redis")
    lb.set_defaults(run=lambda args, settings: asyncio.run(print_leaderboard(settings, args.recompute, args.rounds)))

    ex = sub.add_parser("export", parents=[common], help="Write a logged stream as JSON lines to stdout.")
    ex.add_argument("what", choices=sorted(EXPORTS), help="conversations (the conversation log), votes (anonymous "
                                                          "battles), named-votes (side by side) or feedback.")
    ex.add_argument("--since", default=None,
                    help="Only entries from this time on: an ISO date or time (UTC unless it says), or epoch seconds.")
    add_settings_flags(ex, "redis")
    ex.set_defaults(run=lambda args, settings: asyncio.run(export(settings, args.what, args.since)))


async def print_leaderboard(settings: Settings, recompute: bool, rounds: int) -> int:
    redis = connect(settings.resolved_redis_url(), decode=True)
    try:
        store = ArenaStore(redis, Keys(settings.key_prefix), battle_ttl=settings.arena_battle_ttl,
                           max_entries=settings.votes_max_entries)
        tally = await (store.recompute() if recompute else store.tally())
    finally:
        await redis.aclose()
    rows = await asyncio.to_thread(leaderboard, tally, rounds)
    print(table(rows) if rows else "No anonymous votes yet.")
    return 0


def table(rows: list[Row]) -> str:
    width = max(len("model"), *(len(r.model) for r in rows))
    head = f"{'rank':>4}  {'model':<{width}}  {'rating':>7}  {'95% CI':>15}  {'elo':>7}  {'votes':>6}  {'win rate':>8}"
    lines = [head]
    for r in rows:
        ci = f"-{r.rating - r.ci_low:.0f}/+{r.ci_high - r.rating:.0f}"
        lines.append(f"{r.rank:>4}  {r.model:<{width}}  {r.rating:>7.1f}  {ci:>15}  {r.elo:>7.1f}  {r.votes:>6}  "
                     f"{r.win_rate:>8.1%}")
    return "\n".join(lines)


async def export(settings: Settings, what: str, since: str | None) -> int:
    try:
        start = f"{since_ms(since)}-0" if since else "-"
    except ValueError as exc:
        print(f"redserve export: {exc}", file=sys.stderr)
        return 2
    redis = connect(settings.resolved_redis_url(), decode=True)
    key, json_fields = EXPORTS[what]
    stream = key(Keys(settings.key_prefix))
    try:
        while entries := await redis.xrange(stream, min=start, count=PAGE):
            sys.stdout.write("".join(line + "\n" for line in entries_as_json(entries, json_fields)))
            start = f"({entries[-1][0]}"
    finally:
        await redis.aclose()
    sys.stdout.flush()
    return 0


def since_ms(text: str) -> int:
    """``--since`` as epoch milliseconds (a stream entry id's first half)."""
    try:
        return int(float(text) * 1000)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since wants an ISO date or time, or epoch seconds; got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
