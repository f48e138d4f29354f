"""bench.engine_limit at a tiny size, against the real stack: every figure it reports is there and positive, and
its tables render. Speed is not asserted (numbers come from `python -m bench.engine_limit`)."""

from __future__ import annotations

import json

import pytest

from bench.engine_limit import Options, classify, compute_part, measure, py_spy, render


def test_the_engine_limit_benchmark_measures_and_renders():
    data = measure(Options([1, 2], max_tokens=6, requests_per_lane=2, min_requests=2, repeats=1, min_seconds=0.05,
                           profile_seconds=1, what_if_threads=0, tries=1))
    data = json.loads(json.dumps(data))  # what --json writes, read back
    assert [r["concurrency"] for r in data["rows"]] == [1, 2]
    for r in data["rows"]:
        assert r["gateway"]["tok_s"] > 0 and r["limit"]["tok_s"] > 0 and r["engine"]["tok_s"] > 0
        assert r["share"] == r["gateway"]["tok_s"] / r["limit"]["tok_s"] > 0
        assert r["engine"]["breakdown_us_per_token"]["decode forward"] > 0
        assert r["engine"]["mean_batch"] >= 1 and r["engine"]["steps"] > 0
        cpu = r["gateway"]["cpu_us_per_token"]
        assert cpu["gateway"] > 0 and cpu["client (this process: aiohttp)"] > 0
        if py_spy() is not None:  # the worker's threads named, and its compute thread sampled
            assert cpu["worker: compute thread"] > 0 and cpu["worker: event loop"] > 0
            assert sum(r["gateway"]["compute_thread"].values()) == pytest.approx(1)
            assert r["profile"].get("compute_samples", 0) > 0, r["profile"]
    lines = render(data)
    assert lines[2].startswith("| C | torch threads | gateway tok/s | limit tok/s | share |")
    assert any(line.startswith("| 1 | ") for line in lines) and any(line.startswith("| 2 | ") for line in lines)
    assert any(line.startswith("| decode forward |") for line in lines)


def test_compute_thread_samples_are_sorted_into_the_engines_parts():
    root = "thread (7): hf-engine-x;Thread._bootstrap (threading.py:1002);ComputeThread._run (workers/hf/engine.py:106)"
    step = f"{root};BatchEngine._tick (workers/hf/engine.py:167);BatchEngine._step (workers/hf/engine.py:214)"
    raw = "\n".join([
        f"{step};KVBatch.forward (workers/hf/kv.py:56);_call_impl (torch/nn/modules/module.py:1784) 5",
        f"{step};KVBatch.forward (workers/hf/kv.py:54) 1",
        f"{step};BatchEngine._advance (workers/hf/engine.py:237);IncrementalDecoder.push (workers/hf/text.py:24);"
        "decode (transformers/tokenization_utils_base.py:3000) 2",
        f"{root};ComputeThread._arrivals (workers/hf/engine.py:111) 2",
        "thread (1): MainThread;Runner.run (asyncio/runners.py:118) 4",
    ])
    got = classify(raw)
    assert got["compute_samples"] == 10
    assert got["compute_share"] == {"decode forward": 0.5, "detokenisation": 0.2,
                                    "between steps: arrivals, waiting for work": 0.2,
                                    "decode step: mask and positions (KVBatch.forward)": 0.1}
    assert got["event_loop_top"] == {"Runner.run (asyncio/runners.py:118)": 1.0}
    assert compute_part([f"BatchEngine._admit (workers/hf/engine.py:{n})" for n in (1, 2)]) \
        == "admission (prefill call, first token)"
