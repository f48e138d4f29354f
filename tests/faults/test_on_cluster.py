"""The core end-to-end tests again, on a real Redis Cluster (3 masters, 3 replicas), and a master killed under load.

Every test imported below runs here a second time with ``redis_url`` a
``redis+cluster://`` URL: the official client, streaming, dispatch balance,
worker death, cancel, resumable streams and rate limits, unchanged. The
cluster starts once per session; each test starts on an empty cluster.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from faultkit import pauses, stream_chat, tally
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient
from support import wait_for
from test_dispatch import (  # noqa: F401  # collected again, here on the cluster
    test_batch_jobs_only_take_their_share_in_the_same_atomic_step,
    test_expired_worker_is_pruned_and_skipped,
    test_lottery_follows_speed_weights,
    test_shortest_queue_spreads_200_concurrent_dispatches_evenly,
    test_unknown_model_no_worker_and_busy,
)
from test_openai_api import (  # noqa: F401
    test_chat_non_streaming,
    test_chat_streaming_token_deltas_and_usage,
    test_many_concurrent_requests_all_complete,
    test_models_lists_live_models,
)
from test_resume import test_resume_after_a_dropped_connection_on_another_gateway  # noqa: F401
from test_security import test_request_rate_limit_is_exact_across_gateways, test_token_rate_limit_counts_usage  # noqa: F401
from test_worker_faults import (  # noqa: F401
    test_cancel_by_id_from_another_gateway,
    test_worker_killed_mid_stream,
    test_worker_killed_with_queued_jobs,
)
from test_workers import (  # noqa: F401
    test_client_disconnect_cancels_the_job_on_the_worker,
    test_job_cancelled_while_queued_never_runs,
    test_killed_worker_leaves_dispatch_within_its_ttl,
    test_two_gateways_share_one_pool_of_workers,
)

from broker.connection import connect
from broker.keys import Keys
from redserve.redis_server import RedisCluster, free_port
from workers.echo import echo_tokens


@pytest.fixture
async def redis_url(redis_cluster: RedisCluster) -> str:
    """The cluster's URL, every master flushed (replicas follow)."""
    r = connect(redis_cluster.url, decode=False)
    await r.flushall(target_nodes=ClusterClient.PRIMARIES)  # type: ignore[call-arg]
    await r.aclose()
    return redis_cluster.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = connect(redis_url, decode=True)
    yield r
    await r.aclose()


def owner_of(cluster: RedisCluster, key: str) -> int:
    """The port of the master that owns ``key``'s slot now."""
    slot = int(cluster.cli(cluster.nodes[0].port, "CLUSTER", "KEYSLOT", key).strip().split()[-1])
    for node in cluster.nodes:
        if node.proc is None:
            continue
        for line in cluster.cli(node.port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        break
    raise AssertionError(f"no master owns slot {slot}")


async def test_every_key_of_a_dispatch_is_in_one_slot(redis_cluster):
    """What a dispatch touches hashes to one slot (the scripts would fail with CROSSSLOT otherwise), and a
    request id carries it: the gateway mints ids from the model's tag."""
    from broker.ids import new_request_id

    k, rid = Keys(), new_request_id("some/model:7b")
    names = [k.model_workers("some/model:7b"), k.model_seen("some/model:7b"), k.seat("some/model:7b", "w1"),
             k.jobs("some/model:7b", "w2"), k.request(rid), k.replay(rid)]
    slots = {redis_cluster.cli(redis_cluster.nodes[0].port, "CLUSTER", "KEYSLOT", n).strip() for n in names}
    assert len(slots) == 1, slots


async def test_a_client_whose_key_lookup_node_died_reads_on(redis_url, keys):
    """XREADGROUP's keys have no fixed position: the cluster client asks one node (the default node) COMMAND
    GETKEYS to route it. When that node is gone (its master killed), the client re-reads the topology and reads
    on, instead of failing every read until something else resets it (a worker's job reader stayed deaf)."""
    client = connect(redis_url, decode=False)
    stream = keys.jobs("echo", "reader")
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    await client.xadd(stream, {"f": "v"})
    client.commands_parser.node = ClusterNode("127.0.0.1", free_port())  # type: ignore[attr-defined]  # gone
    try:
        [[_, [(_, fields)]]] = await client.xreadgroup("g", "c", {stream: ">"}, count=1)
    finally:
        await client.aclose()
    assert fields == {b"f": b"v"}


async def test_a_master_killed_under_load_fails_over_and_loses_nothing(stack, redis_cluster, redis, keys, outcome):
    """SIGKILL the master that owns the model's slot while 40 streams run: its replica is promoted, every
    stream ends (complete, or a clean error), none loses or repeats a token, and a new request succeeds within
    a bound. The killed node comes back as a replica, so later tests keep a full cluster."""
    # The production TTL (10 s) rather than the suite's 2 s: a failover takes a few seconds, during which no
    # heartbeat lands; a worker's seat must outlive it, as it does with the defaults.
    live = {"worker_ttl": 10.0, "heartbeat_interval": 1.0}
    w1 = await stack.worker(worker_id="w1", echo_delay=0.05, echo_tokens=40, max_concurrency=32, **live)
    w2 = await stack.worker(worker_id="w2", echo_delay=0.05, echo_tokens=40, max_concurrency=32, **live)
    gw = await stack.gateway(redis_wait=20, reply_timeout=40, **live)
    prompts = [f"failover stream {i}" for i in range(40)]
    calls = [asyncio.create_task(stream_chat(gw.url, p, timeout=60)) for p in prompts]
    await wait_for(lambda: len(w1.tasks) + len(w2.tasks) == 40, timeout=20)  # every stream under way
    await wait_for(lambda: w1.record.tokens_out + w2.record.tokens_out >= 200, timeout=20)
    port = owner_of(redis_cluster, keys.model_workers("echo"))
    [victim] = [n for n in redis_cluster.nodes if n.port == port]
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    killed = time.monotonic()
    results = await asyncio.gather(*calls)
    expected = ["".join(echo_tokens(p, 40)) for p in prompts]
    await tally(outcome, results, expected)
    pauses(outcome, results)  # the longest gap each stream saw: the failover, as a client feels it
    assert outcome.hung == 0 and outcome.lost == 0, outcome
    for res, want in zip(results, expected):  # complete and exact, or a clean error: never a repeated token
        assert res.done, res
        assert res.content == want or (res.error is not None and want.startswith(res.content)), res
    client = gw.client(timeout=60)
    recovered, last = None, None
    while recovered is None and time.monotonic() - killed < 30:
        try:
            await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "after"}])
            recovered = time.monotonic() - killed
        except Exception as exc:  # kept for the assertion's message
            last = exc
            await asyncio.sleep(0.2)
    outcome.notes.append(f"traffic flows again {recovered} s after the kill")
    assert recovered is not None and recovered < 15, (recovered, last)
    print(f"\nfailover: traffic flows again {recovered:.2f} s after SIGKILL of the master; "
          f"{outcome.ok} of {len(prompts)} streams complete, {outcome.clean_errors} clean errors")
    victim.proc = None
    victim.start()  # rejoins as a replica of the promoted node
    await asyncio.to_thread(redis_cluster.wait_ok, 30)


async def test_the_batch_api_on_a_cluster_needs_a_plain_redis_beside_it(stack, redis_server):
    """arq has no Cluster support: without batch_redis_url a gateway on a cluster answers the batch API with a
    clear 503; with one (a plain Redis), files and batches live there while requests are served by the cluster."""
    import httpx

    await stack.worker()
    bare = await stack.gateway()
    async with httpx.AsyncClient(base_url=bare.url) as http:
        r = await http.get("/v1/batches")
        assert r.status_code == 503 and r.json()["error"]["code"] == "batch_unavailable", r.text
        assert (await http.post("/v1/chat/completions", json={
            "model": "echo", "messages": [{"role": "user", "content": "hi"}]})).status_code == 200
    paired = await stack.gateway(batch_redis_url=redis_server.url)
    async with httpx.AsyncClient(base_url=paired.url) as http:
        up = await http.post("/v1/files", data={"purpose": "batch"},
                             files={"file": ("in.jsonl", b'{"custom_id": "a", "method": "POST", "url": '
                                                         b'"/v1/chat/completions", "body": {"model": "echo", '
                                                         b'"messages": [{"role": "user", "content": "x"}]}}\n')})
        assert up.status_code == 200, up.text
        assert (await http.get(f"/v1/files/{up.json()['id']}")).status_code == 200
    plain = aioredis.Redis.from_url(redis_server.url)
    assert await plain.exists(Keys().file(up.json()["id"]))  # the file is on the plain Redis
    await plain.aclose()
