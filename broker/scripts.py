"""The Lua scripts that make multi-key updates atomic, loaded from ``broker/lua``."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def _source(name: str) -> str:
    return resources.files("broker").joinpath("lua", f"{name}.lua").read_text()


@dataclass(frozen=True)
class Scripts:
    """Scripts registered on one client (EVALSHA, falling back to EVAL after a restart)."""

    dispatch: AsyncScript
    heartbeat: AsyncScript
    finish: AsyncScript
    cancel: AsyncScript
    emit: AsyncScript
    ratelimit: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        return cls(
            dispatch=redis.register_script(_source("dispatch")),
            heartbeat=redis.register_script(_source("heartbeat")),
            finish=redis.register_script(_source("finish")),
            cancel=redis.register_script(_source("cancel")),
            emit=redis.register_script(_source("emit")),
            ratelimit=redis.register_script(_source("ratelimit")),
        )
