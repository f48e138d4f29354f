"""The benchmark harness itself: it must measure a real stack, and it must notice a wrong reply.

Speed is not asserted here (numbers come from `python -m bench.matrix`); this
only keeps the harness honest and working.
"""

from __future__ import annotations

import asyncio

from bench.loadgen import run
from bench.matrix import render_md
from bench.redserve_stack import redis_use, redserve


def test_the_harness_checks_replies_and_counts_redis_commands():
    with redserve(workers=1, delay=0.0, max_tokens=16) as st:
        before = st.counters()
        good = asyncio.run(run(st.url, st.model, 4, 16, 16, check_echo=True))
        use = redis_use(before, st.counters(), good.tokens, good.chunks)
        # the echo workers stop at 16 tokens: asking for 32 must be caught as incomplete, every time
        short = asyncio.run(run(st.url, st.model, 2, 4, 32, check_echo=True))
    assert good.errors == [] and len(good.latency) == 16 and good.tokens == 16 * 16
    assert use["reply_msgs"] >= 16 and 0 < use["reply_cmds_per_msg"] <= 1
    assert use["redis_cmds"] > use["reply_cmds"]  # dispatch, reads, acks: every command Redis served counts
    assert len(short.errors) == 4 and all("incomplete" in e for e in short.errors)

    rows = [{"system": "redserve", "workers": 1, "delay_ms": 0.0, "concurrency": 4,
             **{k: round(v, 2) for k, v in good.summary().items()}, "server_cpu_s": 0.5, **use}]
    md = render_md(rows, {"argv": [], "max_tokens": 16})
    assert "| at most one Redis command per streamed message" in md and "| redserve | 0 | 1 | 4 | 16 |" in md


def test_the_floor_servers_answer_like_the_gateway():
    from bench import floor

    rows = floor.measure(concurrency=4, requests=16)
    assert [r["server"] for r in rows] == ["fastapi", "fastapi + sse-starlette", "redserve gateway"]
    # (CPU is read in 10 ms clock ticks: a run this short may read 0, so only its presence is checked)
    assert all(r["errors"] == 0 and r["requests"] == 16 and r["cpu_us_per_request"] >= 0 for r in rows)


def test_the_capacity_slot_spread_counts_every_model_and_gateway_once():
    from bench.capacity import master_ranges, slot_spread

    assert master_ranges(3) == [(0, 5460), (5461, 10922), (10923, 16383)]  # what redis-cli --cluster create assigns
    s = slot_spread(models=100, gateways=50, draws=50, masters=(3, 6))
    assert [sum(r.models_per_master) for r in s.rows] == [100, 100]
    assert [sum(r.gateways_per_master) for r in s.rows] == [50, 50]
    assert all(1 / r.masters <= r.models_max_share <= 1 for r in s.rows) and s.max_models_in_one_slot >= 1
