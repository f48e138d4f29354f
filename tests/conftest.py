"""Fixtures: a real redis-server on a free loopback port, and real gateways and workers.

Gateways run in-process on real sockets (uvicorn on port 0); workers run
in-process, or as real subprocesses where a test needs to signal or kill one.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from support import Stack

from broker.batch import BatchClient
from broker.keys import Keys
from broker.settings import Settings
from redserve.redis_server import RedisCluster, RedisServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> str:
    r = aioredis.Redis.from_url(redis_server.url)
    await r.flushall()
    await r.aclose()
    return redis_server.url


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """Short TTLs so liveness tests take seconds, not minutes."""
    return Settings(redis_url=redis_url, worker_ttl=2.0, heartbeat_interval=0.5, reply_timeout=10.0,
                    drain_timeout=20.0, echo_tokens=8)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield r
    await r.aclose()


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
async def batches(settings: Settings) -> AsyncIterator[BatchClient]:
    async with BatchClient(settings.redis_url, settings) as client:
        yield client


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    s = Stack(settings)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight chat model (``redserve tiny-model``), with a 4096-token context."""
    from workers.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), context_length=4096)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A real 3-master, 3-replica Redis Cluster on loopback, started once per session (about 7 s)."""
    with RedisCluster() as cluster:
        yield cluster
