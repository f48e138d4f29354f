"""Noticing a client that hung up while its request waits on a worker.

Starlette only notices a disconnect when it next sends; a non-streaming
request (or a streaming one still waiting for its first token) would keep its
worker busy for nobody. Racing the wait against ``http.disconnect`` lets the
gateway cancel the job at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected; there is nobody to answer."""


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; if the client disconnects first, cancel it and raise ClientGone.

    The wait runs in the caller's task and one watcher cancels it: this is on every request's path, and a
    second task for the work (with ``asyncio.wait`` over both) cost more than all the rest of the wait.
    """
    waiting = asyncio.current_task()
    assert waiting is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(request)
        gone = True
        waiting.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await awaitable
    except asyncio.CancelledError:
        if gone and waiting.uncancel() == 0:  # our cancel, and nobody else's: the client left
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()
        if watcher.done() and not watcher.cancelled():
            watcher.exception()  # retrieved: a receive that failed is not the caller's error


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
