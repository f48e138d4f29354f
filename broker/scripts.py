"""The Lua scripts that make multi-key updates atomic, loaded from ``broker/lua``."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def source(name: str) -> str:
    """A script's text, by its file name in ``broker/lua``."""
    return resources.files("broker").joinpath("lua", f"{name}.lua").read_text()


@dataclass(frozen=True)
class Scripts:
    """Scripts registered on one client (EVALSHA, falling back to EVAL after a restart)."""

    dispatch: AsyncScript
    heartbeat: AsyncScript
    record: AsyncScript
    finish: AsyncScript
    cancel: AsyncScript
    emit: AsyncScript
    ratelimit: AsyncScript
    vote: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        return cls(
            dispatch=redis.register_script(source("dispatch")),
            heartbeat=redis.register_script(source("heartbeat")),
            record=redis.register_script(source("record")),
            finish=redis.register_script(source("finish")),
            cancel=redis.register_script(source("cancel")),
            emit=redis.register_script(source("emit")),
            ratelimit=redis.register_script(source("ratelimit")),
            vote=redis.register_script(source("vote")),
        )
