"""Redis with a replica and three Sentinels, all real processes on loopback: the master is SIGKILLed under 40
streams and a running batch, and nothing accepted is lost or run twice.

The deployment is started once for this module (the failover ends it).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
import redis as sync_redis
from batchkit import jsonl, lines, running_runner
from faultkit import pauses, stream_chat, tally
from support import Stack, kill, wait_for

from redserve.redis_server import find_binary, free_port
from workers.echo import echo_tokens

MASTER = "redserve-ha"
STREAMS, TOKENS = 40, 40
#: Sentinel's judgement of a dead master, and its failover, as configured below.
DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS = 1000, 5000


@dataclass
class Deployment:
    master_port: int
    replica_port: int
    sentinel_ports: list[int]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}"

    def replica_in_sync(self) -> bool:
        """Whether the replica has everything the master has (within a moment of replication)."""
        for _ in range(20):
            with sync_redis.Redis(port=self.master_port) as m, sync_redis.Redis(port=self.replica_port) as r:
                if r.info("replication")["slave_repl_offset"] >= m.info("replication")["master_repl_offset"]:
                    return True
            time.sleep(0.05)
        return False

    def master(self) -> int:
        """The port the Sentinels name as master now."""
        with sync_redis.Redis(port=self.sentinel_ports[0], socket_timeout=1) as s:
            return int(s.sentinel_get_master_addr_by_name(MASTER)[1])


def _server(base: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    """One redis-server (or Sentinel) in a directory of its own: two servers in one would write each other's
    AOF files (a master once failed to start, renaming a manifest the replica had just moved)."""
    directory = base / name
    directory.mkdir()
    return subprocess.Popen([find_binary(), *args, "--dir", str(directory),
                             "--logfile", str(directory / f"{name}.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(free_port(), free_port(), [free_port() for _ in range(3)])
    base = tmp_path_factory.mktemp("sentinel")
    # Diskless replication with no delay: the replica is in sync a moment after it connects (Redis 7 waits 5 s
    # by default, for more replicas to share one transfer).
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--maxmemory-policy", "noeviction",
              "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
    d.procs["master"] = _server(base, "master", "--port", str(d.master_port), *common)
    d.procs["replica"] = _server(base, "replica", "--port", str(d.replica_port), *common,
                                 "--replicaof", "127.0.0.1", str(d.master_port))
    for i, port in enumerate(d.sentinel_ports):
        conf = base / f"sentinel-{i}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\n"
                        f"sentinel monitor {MASTER} 127.0.0.1 {d.master_port} 2\n"
                        f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                        f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
                        f"sentinel parallel-syncs {MASTER} 1\n")
        d.procs[f"sentinel-{i}"] = _server(base, f"sentinel-{i}", str(conf), "--sentinel")
    try:
        end = time.monotonic() + 60
        while True:  # the replica is in sync, and every Sentinel knows it and the other two Sentinels
            try:
                with sync_redis.Redis(port=d.replica_port, socket_timeout=1) as r:
                    ready = r.info("replication").get("master_link_status") == "up"
                for port in d.sentinel_ports:
                    with sync_redis.Redis(port=port, socket_timeout=1) as s:
                        ready &= len(s.sentinel_slaves(MASTER)) == 1 and len(s.sentinel_sentinels(MASTER)) == 2
                if ready:
                    break
            except sync_redis.RedisError:
                pass
            assert time.monotonic() < end, "the Sentinel deployment did not form"
            time.sleep(0.2)
        yield d
    finally:
        for proc in d.procs.values():
            kill(proc)


async def test_master_killed_under_streams_and_a_batch(deployment, settings, outcome):
    """SIGKILL the master under 40 streams and a 300-line batch: the Sentinels promote the replica; every
    stream ends (whole, or a clean error; none hung); the batch completes with every custom_id exactly once;
    new requests flow again within down-after-milliseconds plus the failover."""
    s = settings.model_copy(update={"redis_url": deployment.url, "redis_wait": 15.0, "reply_timeout": 30.0,
                                    "worker_ttl": 5.0, "heartbeat_interval": 1.0})
    stack = Stack(s)
    try:
        stack.spawn_worker("ha", echo_delay=0.05, echo_tokens=TOKENS, max_concurrency=96)
        gw = await stack.gateway()
        client = gw.client(timeout=60)
        await wait_for(lambda: _served(client), timeout=20)
        async with running_runner(s):
            uploaded = await client.files.create(file=("ha.jsonl", lines(300, max_tokens=2, prefix="ha")),
                                                 purpose="batch")
            batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                completion_window="24h")
            streams = asyncio.gather(*(stream_chat(gw.url, f"ha {i} " * TOKENS, max_tokens=TOKENS, timeout=60)
                                       for i in range(STREAMS)), return_exceptions=True)
            await asyncio.sleep(0.6)
            old = deployment.master()
            assert deployment.replica_in_sync(), "the replica fell behind: this would test lag, not failover"
            deployment.procs["master"].kill()
            killed = time.monotonic()
            flowing = await wait_for(lambda: _served(client), timeout=30, interval=0.1)
            back_after = time.monotonic() - killed
            results = await streams
            settle = time.monotonic() + 90  # a batch that stops moving fails here, saying where it stood
            while batch.status not in ("completed", "failed", "cancelled", "expired"):
                assert time.monotonic() < settle, f"the batch did not finish after the failover: {batch}"
                await asyncio.sleep(0.2)
                batch = await client.batches.retrieve(batch.id)
        assert flowing and deployment.master() != old  # the replica was promoted
        await tally(outcome, results, ["".join(echo_tokens(f"ha {i} " * TOKENS, TOKENS)) for i in range(STREAMS)])
        pauses(outcome, results)
        outcome.notes.append(f"new requests flowed {back_after:.1f} s after the kill")
        assert outcome.hung == 0 and outcome.lost == 0, outcome.notes[:3]
        assert outcome.ok + outcome.clean_errors == STREAMS
        assert batch.status == "completed", batch
        out = jsonl((await client.files.content(batch.output_file_id)).content)
        ids = [o["custom_id"] for o in out]
        assert sorted(ids) == sorted(f"ha-{i}" for i in range(300)) and len(ids) == len(set(ids))
        # The bound: Sentinel needs down-after-milliseconds to call the master dead, then elects and promotes.
        assert back_after < (DOWN_AFTER_MS + FAILOVER_TIMEOUT_MS) / 1000 + 5, back_after
        print(f"\nsentinel failover: new requests flowed {back_after:.2f} s after SIGKILL; "
              f"streams ok {outcome.ok}, clean errors {outcome.clean_errors}")
    finally:
        await stack.close()


async def _served(client: openai.AsyncOpenAI) -> bool:
    try:
        reply = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "ping"}],
                                                     max_tokens=2, timeout=5)
    except openai.APIError:
        return False
    return reply.choices[0].message.content == "".join(echo_tokens("ping", 2))
