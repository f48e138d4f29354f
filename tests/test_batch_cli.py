"""``redserve batch`` as a real process: submit with a live progress line and results in input order;
status; cancel."""

from __future__ import annotations

import asyncio
import json

from batchkit import jsonl, lines, running_runner, wait_batch
from support import run_redserve, settings_env

from broker.batch import BatchClient
from workers.echo import echo_tokens


async def redserve(settings, *args: str) -> tuple[int, str, str]:  # noqa: ANN001
    """`redserve ARGS` in a thread: the runner and workers it talks to live in this event loop."""
    done = await asyncio.to_thread(run_redserve, *args, env=settings_env(settings), timeout=60)
    return done.returncode, done.stdout, done.stderr


async def test_submit_shows_progress_and_writes_results_in_order(stack, settings, tmp_path):
    await stack.worker(["echo"], echo_delay=0.002, echo_tokens=4)
    src = tmp_path / "requests.jsonl"
    # plain request bodies: the endpoint is inferred, --model fills in the model, custom_id is line-<n>
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"cli {i}"}]}) + "\n"
                           for i in range(300)))
    out = tmp_path / "results.jsonl"
    async with running_runner(settings):
        code, stdout, stderr = await redserve(settings, "batch", "submit", str(src), "--model", "echo",
                                              "--out", str(out))
    assert code == 0, stderr
    progress = [line for line in stderr.splitlines() if " done " in line]
    assert progress and "completed" in progress[-1] and "300/300 done  0 failed" in progress[-1], stderr
    assert "req/s" in progress[-1] and "ETA" in progress[-1]
    results = jsonl(out.read_bytes())
    assert [r["custom_id"] for r in results] == [f"line-{i + 1}" for i in range(300)]
    assert results[7]["response"]["body"]["choices"][0]["message"]["content"] == "".join(echo_tokens("cli 7", 4))

    batch_id = stderr.split(":", 1)[0].strip()
    code, stdout, _ = await redserve(settings, "batch", "status", batch_id)
    assert code == 0 and stdout.split()[:3] == [batch_id, "completed", "300/300"], stdout
    code, stdout, _ = await redserve(settings, "batch", "status", batch_id, "--json")
    assert json.loads(stdout)["request_counts"] == {"total": 300, "completed": 300, "failed": 0}
    code, _, stderr = await redserve(settings, "batch", "cancel", batch_id)
    assert code == 1 and "can no longer be cancelled" in stderr


async def test_cancel_from_the_cli(stack, settings, batches: BatchClient):
    await stack.worker(["echo"], max_concurrency=2, echo_delay=0.05)
    uploaded = await batches.create_file(lines(40), filename="r.jsonl")
    batch = await batches.create_batch(input_file_id=uploaded["id"], endpoint="/v1/chat/completions")
    code, stdout, _ = await redserve(settings, "batch", "cancel", batch["id"])  # no runner yet: still validating
    assert code == 0 and stdout.split()[:2] == [batch["id"], "cancelling"], stdout
    async with running_runner(settings):
        final = await wait_batch(batches, batch["id"], timeout=10)
    assert final["status"] == "cancelled" and final["request_counts"]["completed"] == 0
    code, _, stderr = await redserve(settings, "batch", "status", "batch_nope")
    assert code == 1 and "No batch found" in stderr


async def test_malformed_file_from_the_cli(stack, settings, tmp_path):
    await stack.worker(["echo"])
    src = tmp_path / "bad.jsonl"
    src.write_bytes(lines(2) + b"{not json\n")
    async with running_runner(settings):
        code, _, stderr = await redserve(settings, "batch", "submit", str(src))
    assert code == 1 and "invalid_json_line: Line 3 is not valid JSON" in stderr, stderr
