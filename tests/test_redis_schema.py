"""docs/redis.md stays true: each key it names exists on a live stack, and its redis-cli commands work."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.keys import Keys, model_tag, request_tag

DOC = Path(__file__).parent.parent / "docs" / "redis.md"


def untagged(key: str, tag: str) -> str:
    """The key as docs/redis.md spells it, its hash tag written ``{<tag>}``."""
    assert f"{{{tag}}}" in key
    return key.replace(f"{{{tag}}}", "{<tag>}")


def test_every_key_builder_is_documented():
    doc = DOC.read_text()
    k = Keys()
    samples = {
        "worker": k.worker("<id>"), "worker_control": k.worker_control("<id>"),
        "workers": k.workers(), "models": k.models(),
        "model_workers": untagged(k.model_workers("<model>"), model_tag("<model>")),
        "seat": untagged(k.seat("<model>", "<id>"), model_tag("<model>")),
        "jobs": untagged(k.jobs("<model>", "<id>"), model_tag("<model>")),
        "model_seen": untagged(k.model_seen("<model>"), model_tag("<model>")),
        "replies": k.replies("<gateway-id>"),
        "request": untagged(k.request("<request-id>"), request_tag("<request-id>")),
        "dead_letters": k.dead_letters(), "reclaim_lock": k.reclaim_lock("<id>"), "votes": k.votes(),
        "replay": untagged(k.replay("<request-id>"), request_tag("<request-id>")),
        "rate": k.rate("<tenant-id>", "<minute>", "requests"),
        "batch_queue": k.batch_queue(), "batch_runner_health": k.batch_runner_health(),
        "batch_job_result": k.batch_job_result("<job-id>"), "batch": k.batch("<batch-id>"),
        "batch_results": k.batch_results("<batch-id>"), "batches": k.batches(), "file": k.file("<file-id>"),
        "tenant_batches": k.tenant_batches("<tenant-id>"), "tenant_files": k.tenant_files("<tenant-id>"),
        "battle": k.battle("<battle-id>"), "battle_turn": k.battle_turn("<battle-id>"),
        "arena_votes": k.arena_votes(), "leaderboard": k.leaderboard(),
        "leaderboard_lock": k.leaderboard_lock(), "feedback": k.feedback(), "conversations": k.conversations(),
    }
    public = {n for n in dir(Keys) if not n.startswith("_") and callable(getattr(Keys, n))
              and not n.endswith("_prefix")}
    assert public == samples.keys(), "a new key builder needs a row in docs/redis.md and here"
    for name, pattern in samples.items():
        assert f"`{pattern}`" in doc, f"{name}: {pattern} is missing from docs/redis.md"


def redis_cli() -> str:
    found = shutil.which("redis-cli")
    if not found:
        pytest.fail("redis-cli is not installed: .ci/run installs redis-tools")
    return found


async def test_documented_commands_show_the_live_stack(stack, redis_url):
    w = await stack.worker(["echo"], worker_id="echo-doc", echo_delay=0.3, max_concurrency=1)
    gw = await stack.gateway()
    client = gw.client()
    running = [asyncio.create_task(client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": f"doc {i}"}])) for i in range(2)]
    await asyncio.sleep(0.5)  # one job running, one waiting

    commands = re.findall(r"^\$ \$R (.+?)(?:\s{2,}#.*)?$", DOC.read_text(), flags=re.M)
    assert len(commands) >= 10
    outputs = {}
    for cmd in commands:
        if cmd.startswith("SUBSCRIBE"):
            continue  # blocks by design
        cmd = cmd.replace("echo-1a2b3c4d", w.id).replace("<request-id>", "no-such-request")
        args = [a.strip("'") for a in cmd.split()]
        proc = await asyncio.to_thread(subprocess.run, [redis_cli(), "-u", redis_url, *args],
                                       capture_output=True, text=True, errors="replace", timeout=10)
        assert proc.returncode == 0 and "ERR" not in proc.stdout, (cmd, proc.stdout, proc.stderr)
        outputs[cmd.split()[0] + " " + cmd.split()[1]] = proc.stdout
    k = Keys()
    assert "echo-doc" in outputs["HGETALL redserve:workers"]
    assert "draining" not in outputs["HGETALL redserve:worker:echo-doc"]
    zrange = outputs[f"ZRANGE {k.model_workers('echo')}"].split()
    assert zrange == ["echo-doc", "2"]  # two jobs: one running, one waiting
    assert "ready" in outputs[f"HGETALL {k.seat('echo', 'echo-doc')}"]
    assert outputs[f"XLEN {k.jobs('echo', 'echo-doc')}"].strip() == "2"
    assert "echo-doc" in outputs[f"XPENDING {k.jobs('echo', 'echo-doc')}"]  # the running one, held by the worker
    assert "redserve:replies:" in outputs["PUBSUB CHANNELS"]
    await asyncio.gather(*running)
