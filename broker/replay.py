"""Reading a request's replay log: what a resumed stream renders.

The log is a stream that ``dispatch.lua`` opens with a meta entry (a
``StreamMeta`` and the owner) and that ``emit.lua`` appends each reply message
to as the worker publishes it. Those two scripts write it; this module reads
it, through the codec's ``replay_head`` and ``replay_reply``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from broker.protocol import Reply, StreamMeta, replay_head, replay_reply


@dataclass(slots=True)
class Replay:
    """Reading one request's replay log: its meta, its owner, the replies so far, and where reading goes on."""

    key: str
    meta: StreamMeta
    owner: str
    replies: list[Reply]
    cursor: bytes | str = "0-0"


async def open_log(redis: Redis, key: str) -> Replay | None:
    """The whole log so far; None when there is none (never resumable, or its window passed)."""
    entries = await redis.xrange(key)
    head = replay_head(entries[0][1]) if entries else None
    if head is None:
        return None
    replay = Replay(key, *head, [], entries[0][0])
    replay.replies = _read(replay, entries[1:])
    return replay


async def follow(redis: Redis, replay: Replay, block_ms: int) -> list[Reply]:
    """Replies appended since the last read, waiting up to ``block_ms`` for the first (``[]`` when none came)."""
    more = await redis.xread({replay.key: replay.cursor}, count=1000, block=block_ms)
    return _read(replay, more[0][1]) if more else []


def _read(replay: Replay, entries: list[Any]) -> list[Reply]:
    """The replies of ``entries``; the cursor moves past them."""
    if entries:
        replay.cursor = entries[-1][0]
    return [replay_reply(fields) for _, fields in entries]
