"""Helpers tests import (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):  # noqa: ANN001, ANN201
    """Poll an async or sync predicate until it returns something truthy."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
