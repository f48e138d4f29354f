"""The cancellation benchmark (bench.cancel): against the real stack, with a few streams, every figure is
computed from what the tap saw in Redis, and the stage trace reaches into the gateway and the worker.

No latency is asserted beyond "the worker stopped long before its 64 tokens" (the numbers come from
`python -m bench.cancel`); this keeps the harness honest and working.
"""

from __future__ import annotations

from bench.cancel import Opened, TapRecord, measure, parser, per_request, render, sort_tap, summarise
from broker.errors import ServeError
from broker.keys import Keys
from broker.protocol import Cancel, ChoiceEnd, Delta, Done, Reply, Usage, bundle, pack


def test_a_few_dropped_streams_of_the_real_stack_are_cancelled_and_counted():
    o = parser().parse_args(["-n", "10", "--delay", "0.02", "--max-tokens", "64"])
    run = measure(10, o, trace=True)
    assert run["error_count"] == 0 and run["streams"] == 10 and run["ended_before_drop"] == 0
    assert run["outcomes"] == {"cancelled": 10}  # every job ended by the gateway's Cancel, none ran out
    after = run["after"]
    assert after["n"] == 10 and 0 <= after["p50"] <= after["p99"] <= after["max"] < 32
    assert run["after_generated_mean"] is not None and run["after_generated_mean"] >= 0
    # the Cancel went out before the worker's last message, both after the drop, and each stream was cut short
    assert run["cancel_ms"]["n"] == 10 and 0 < run["cancel_ms"]["p50"] <= run["stop_ms"]["p50"] < 1000
    assert run["published_total"] < 10 * 64 and run["generated_total"] >= run["published_total"]
    assert run["loadgen_cpu_drop_s"] >= 0 and set(run["cpu_window_s"]) >= {"loadgen", "gateway", "workers"}
    stages = run["stages"]
    for stage in ("lost", "listener", "release", "publish", "control", "job_done"):  # inside the processes
        assert stages[stage]["n"] >= 10, (stage, stages[stage])
    assert stages["release"]["p50"] <= stages["publish"]["p50"] <= stages["control"]["p50"]
    assert set(run["loop_lag_ms"]) == {"gateway", "worker"}
    assert run["generated_after"]["n"] == 10 and 0 <= run["generated_after"]["max"] < 32  # the worker's own clock

    data = {"meta": {"date": "today", "machine": "test", "workers": 1, "delay_ms": 20.0, "max_tokens": 64},
            "runs": [run, {**run, "n": 500, "traced": False}]}
    md = "\n".join(render(data))
    assert "| 10 | yes | 10 |" in md and "| 500 |  | 10 |" in md and "enters _release" in md


def _reply(rid: str, seq: int, *events: object) -> bytes:
    return Reply(rid, seq, list(events)).encode()  # type: ignore[arg-type]


def test_the_tap_counts_tokens_published_after_each_drop():
    k = Keys()
    replies, control = k.replies("gw").encode(), k.worker_control("w1").encode()
    cancelled = ServeError("The request was cancelled.", status=499, code="cancelled").event()
    records: list[TapRecord] = [
        (1.00, replies, _reply("a", 0, Delta(0, "x"))),
        (1.01, replies, bundle([_reply("a", 1, Delta(0, " y", 2)), _reply("b", 0, Delta(0, "z"))])),
        (1.05, control, pack(Cancel("a"))),
        (1.06, replies, bundle([_reply("a", 2, Delta(0, " w"), cancelled), _reply("b", 1, Delta(0, " v"))])),
        (1.07, replies, _reply("b", 2, ChoiceEnd(0, "stop"), Done(Usage(1, 2)))),
    ]
    by_rid = sort_tap(records)
    assert by_rid["a"].t_cancel == 1.05 and by_rid["a"].outcome == "cancelled" and by_rid["b"].outcome == "done"
    streams = [Opened(0, rid="a", t_first=1.015, t_drop=1.02), Opened(1, rid="b", t_first=1.02, t_drop=1.03),
               Opened(2, error="HTTP 503")]
    rows = per_request(streams, by_rid)
    assert [(r["rid"], r["before"], r["after"], r["tokens"]) for r in rows] == [("a", 3, 1, 4), ("b", 1, 1, 2)]
    a = rows[0]
    assert round(a["cancel_ms"], 3) == 30.0 and round(a["stop_ms"], 3) == 40.0 and round(a["worker_ms"], 3) == 10.0
    assert round(a["tap_lead_ms"], 3) == 15.0  # the client read its first token 15 ms after the tap saw it
    assert rows[1]["cancel_ms"] is None and rows[1]["outcome"] == "done" and rows[1]["worker_ms"] is None
    assert round(a["token_ms"], 3) == 5.0 and rows[1]["token_ms"] is None  # 10 ms for the 2 tokens after a's first
    s = summarise(rows, generated=7, tap_tokens_before_all=4)
    assert s["after"]["max"] == 1 and s["after"]["mean"] == 1.0 and s["after_generated_mean"] == 1.5
    assert s["outcomes"] == {"cancelled": 1, "done": 1} and s["cancel_ms"]["n"] == 1
