"""Redis clients. Two flavours: text (decoded, for records a person reads) and raw (msgpack payloads).

Every process reaches Redis through this module, so one URL form works
everywhere: ``redis://`` and ``rediss://`` for one server, and
``redis+sentinel://[user:password@]host:port[,host:port...]/<master name>[/<db>]``
for a replicated Redis behind Sentinels (``rediss+sentinel://`` with TLS;
``?sentinel_password=...`` when the Sentinels need one). With Sentinel every new connection asks the Sentinels
where the master is, so a failover is followed by reconnecting: the callers'
retry loops already do that.

``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://`` with TLS) is a Redis
Cluster: any of its nodes finds the rest. The client is redis-py's asyncio ``RedisCluster``, which follows
``MOVED``/``ASK`` and a failover by refreshing its slot table; it has the same command methods as ``Redis``,
so callers hold either as ``Redis`` and ask ``is_cluster`` where the two differ (pub/sub, see
``broker.pubsub``; no MULTI across slots).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    MasterDownError,
    RedisClusterException,
    TimeoutError,
    TryAgainError,
)

T = TypeVar("T")

#: Failures that mean "Redis is not there now" (wait, and try again), as opposed to a refused command. On a
#: cluster a failover also shows as CLUSTERDOWN, TRYAGAIN, MASTERDOWN, or redis-py's RedisClusterException
#: (no node reachable, a slot not covered yet), which is not a RedisError at all.
UNREACHABLE: tuple[type[BaseException], ...] = (
    ConnectionError, TimeoutError, OSError, ClusterDownError, TryAgainError, MasterDownError, RedisClusterException)

SENTINEL_SCHEME, SENTINEL_TLS_SCHEME = "redis+sentinel", "rediss+sentinel"
CLUSTER_SCHEME, CLUSTER_TLS_SCHEME = "redis+cluster", "rediss+cluster"


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A master found through Sentinels."""

    sentinels: list[tuple[str, int]]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)
    #: ``rediss+sentinel://``: TLS to the master (and the Sentinels).
    tls: bool = False


def sentinel_target(url: str) -> SentinelTarget | None:
    """The Sentinel deployment a ``redis+sentinel://`` URL names; None for a plain Redis URL."""
    parts = urlsplit(url)
    if parts.scheme not in (SENTINEL_SCHEME, SENTINEL_TLS_SCHEME):
        return None
    form = "redis+sentinel://[user:password@]host:port[,host:port...]/<master name>[/<db>]"
    user, password, sentinels = _credentials_and_hosts(url, form, default_port=26379)
    path = [p for p in parts.path.split("/") if p]
    if not path or (len(path) > 1 and not path[1].isdigit()):
        raise ValueError(f"{url!r}: the form is {form}")
    query = parse_qs(parts.query)
    extra = {"password": query["sentinel_password"][0]} if "sentinel_password" in query else {}
    return SentinelTarget(sentinels, path[0], int(path[1]) if len(path) > 1 else 0, user, password,
                          {"socket_timeout": 1.0, "socket_connect_timeout": 1.0, **extra},
                          tls=parts.scheme == SENTINEL_TLS_SCHEME)


def _credentials_and_hosts(url: str, form: str, *,
                           default_port: int | None) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """The user, password and ``host:port`` list of a multi-host URL (Sentinel, Cluster); a host without a port
    takes ``default_port`` (None: the port is required)."""
    auth, _, hosts = urlsplit(url).netloc.rpartition("@")
    user, _, password = auth.partition(":")
    found = []
    for host in hosts.split(","):
        name, colon, port = host.rpartition(":")
        if not colon or name.endswith(":") or (host.startswith("[") and not name.endswith("]")):
            name, port = host, ""  # no port given (an IPv6 address has colons of its own)
        if (port and not port.isdigit()) or (not port and default_port is None):
            raise ValueError(f"{url!r}: bad port {port!r}; the form is {form}")
        found.append((name.strip("[]"), int(port or default_port or 0)))
    return unquote(user) or None, unquote(password) or None, found


def _client_options(decode: bool) -> dict[str, Any]:
    """What every redserve client has: decoding or not, and a short retry of a dropped connection (about 1 s
    over its five tries) before the caller's own patience takes over."""
    return {
        "decode_responses": decode,
        "retry": Retry(ExponentialBackoff(cap=0.25, base=0.05), retries=5),
        "health_check_interval": 30,
    }


def connection_pool(url: str, *, decode: bool = False, **kwargs: Any) -> ConnectionPool:
    """A connection pool for ``url`` (a plain Redis, or the master behind Sentinels) that retries a dropped
    connection with a short backoff (about 1 s over its five tries): the callers that must outlast a longer
    outage (the outbox, the reply router, dispatch) wait on their own terms, and a Redis that is back, or a
    new master, is used at once."""
    options: dict[str, Any] = {**_client_options(decode), "retry_on_error": [ConnectionError, TimeoutError], **kwargs}
    if is_cluster_url(url):
        raise ValueError(f"{url!r} is a Redis Cluster, and this part of redserve needs one Redis (the batch "
                         "queue, arq, has no Cluster support): give it a plain redis:// URL (--batch-redis-url)")
    target = sentinel_target(url)
    if target is None:
        return ConnectionPool.from_url(url, **options)
    tls = {"ssl": True} if target.tls else {}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py's asyncio Sentinel has no annotations
        target.sentinels, sentinel_kwargs={**target.sentinel_kwargs, **tls})
    return SentinelConnectionPool(  # type: ignore[no-untyped-call]  # likewise
        target.master, sentinel, db=target.db, username=target.username, password=target.password, **tls, **options)


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``)."""
    return urlsplit(url).scheme in (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME)


def cluster_client(url: str, *, decode: bool = False, **kwargs: Any) -> RedisCluster:
    """A Redis Cluster client for a ``redis+cluster://`` URL: the nodes it names are where it starts, the
    cluster tells it the rest."""
    user, password, hosts = _credentials_and_hosts(
        url, "redis+cluster://[user:password@]host:port[,host:port...]", default_port=None)
    options: dict[str, Any] = {
        **_client_options(decode),
        # a hung node (stopped, partitioned) must not hang a slot-table refresh: fail over to the next
        "socket_connect_timeout": 2.0,
        "socket_timeout": 10.0,
        "username": user,
        "password": password,
        # a failover takes the node timeout (seconds) to be noticed: keep asking meanwhile
        "cluster_error_retry_attempts": 8,
        **({"ssl": True} if urlsplit(url).scheme == CLUSTER_TLS_SCHEME else {}),
        **kwargs,
    }
    nodes = [ClusterNode(host, port) for host, port in hosts]
    cluster: RedisCluster = Cluster(startup_nodes=nodes, **options)
    return cluster


class Cluster(RedisCluster):
    """redis-py's ``RedisCluster``, re-reading the topology when the node it asks for command keys is gone.

    A command whose keys have no fixed position (XREADGROUP, XREAD) is routed by asking one node (the default
    node, chosen when the slot table was read) ``COMMAND GETKEYS``. redis-py 5.3 re-reads the slot table when
    a command's own node fails, not when that one does: after a failover of the default node's master, every
    such command failed until something else on the client happened to fail (a worker's job reader stayed deaf
    for half a minute). Here that failure resets the topology, so the client's retry reads it afresh.
    """

    async def _determine_slot(self, command: str, *args: Any) -> int:
        try:
            return await super()._determine_slot(command, *args)
        except (ConnectionError, TimeoutError):
            await self.aclose()  # as redis-py does for a data node: the next attempt re-reads the slot table
            raise


def connect(url: str, *, decode: bool = True, **kwargs: Any) -> Redis:
    """A client for ``url`` that owns its pool (``aclose`` closes its connections).

    For a ``redis+cluster://`` URL it is a ``RedisCluster``, typed as ``Redis``: the commands redserve sends
    are the same methods on both, and ``is_cluster`` tells the places that differ."""
    if is_cluster_url(url):
        return cast(Redis, cluster_client(url, decode=decode, **kwargs))
    return Redis.from_pool(connection_pool(url, decode=decode, **kwargs))


async def execute(pipe: Any, *, raise_on_error: bool = True) -> list[Any]:
    """Run a pipeline. redis-py 5.3's cluster pipeline reads the client's default node after the call, and a
    task that reset the client's topology meanwhile (a failover) left it None: that AttributeError is said as
    what it is, a connection lost to the cluster, so every caller's "Redis is away" handling takes it."""
    try:
        results: list[Any] = await pipe.execute(raise_on_error=raise_on_error)
    except AttributeError as exc:
        if not is_cluster(pipe):
            raise
        raise ConnectionError("the cluster's topology was reset under this pipeline (a failover)") from exc
    return results


async def refresh_slots(redis: Redis | RedisCluster) -> None:
    """Read a cluster's slot table again (nothing on one Redis). redis-py refreshes it when a command raises,
    but not for a failure a pipeline hands back as a result, nor for a subscription it does not know of."""
    if is_cluster(redis):
        await cast(RedisCluster, redis).nodes_manager.initialize()


def own_connection(source: ConnectionPool | ClusterNode, **overrides: Any) -> AbstractConnection:
    """A connection outside ``source``'s pool (a pool's, or a cluster node's), with its settings: credentials,
    TLS, decoding, timeouts, the master a Sentinel names. Less redis-py's health check, whose PING expects a
    +PONG that a subscribed or pipelined connection does not read where it looks: its owner watches it."""
    kwargs: dict[str, Any] = {**source.connection_kwargs, "health_check_interval": 0, **overrides}
    conn: AbstractConnection = source.connection_class(**kwargs)
    return conn


def atomic_pipeline(redis: Redis) -> Any:
    """A pipeline whose commands (keys of one slot) apply together: MULTI/EXEC on one Redis. redis-py 5's
    asyncio cluster client has no MULTI, so on a cluster they go in order in one pipeline (a client that dies
    half-way leaves the first ones applied)."""
    return redis.pipeline(transaction=not is_cluster(redis))


def is_cluster(redis: object) -> bool:
    """Whether ``redis`` (a client, or a pipeline of one) talks to a Redis Cluster."""
    return isinstance(redis, RedisCluster | ClusterPipeline)


async def resolved(reply: Awaitable[T] | T) -> T:
    """The reply of an asyncio redis-py command, typed: redis-py 5 declares many as ``Awaitable[T] | T``."""
    return await reply if inspect.isawaitable(reply) else reply
