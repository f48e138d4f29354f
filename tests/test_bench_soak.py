"""The soak harness (bench.soak): a short soak of the real stack computes every verdict field and passes, and
the end-of-run audit catches a key left without a TTL and a load score left above 0.

Memory figures are not asserted beyond the verdict (the long run is `python -m bench.soak`); this keeps the
harness honest and working.
"""

from __future__ import annotations

from redis import Redis

from bench.soak import audit, growth, render, soak
from broker.keys import Keys
from redserve.redis_server import RedisServer


def test_a_short_soak_of_the_real_stack_computes_and_passes_every_check():
    # resend_window 2 s: a worker keeps finished jobs' publishers that long, so it is judged from the warm-up
    # (3.3 s) rather than from 30 s, which a 20 s run never reaches
    data = soak(minutes=20 / 60, rate=10, max_tokens=16, drain=1.0, extra={"resend_window": 2.0}, quiet=True)
    v = data["verdict"]
    assert v["requests"] == 200 and v["done"] == 200 and v["errors"] == 0 and v["errors_ok"] is True
    assert len(data["samples"]) >= 12 and data["samples"][-1]["t"] >= 19.5
    assert {s["in_flight"] for s in data["samples"]} <= set(range(0, 20))  # the open loop kept up
    # gateway and worker: judged, under 10%; Redis keeps each request's hash 120 s by design, which a 20 s run
    # never gets past, and says so rather than judging the keyspace filling up
    for name in ("gateway", "worker 1"):
        m = v["memory"][name]
        assert m["growth"] is not None and m["ok"] is True and m["at_warmup_mb"] > 10, (name, m)
    assert v["memory_not_judged"] == ["redis", "redis used_memory"]
    assert "120 s" in v["memory"]["redis"]["note"]
    assert v["memory_ok"] is True
    # the keys meant to live forever are there, each recognised; nothing else lacks a TTL
    k = Keys()
    permanent = {row["key"]: row["allowed"] for row in data["audit"]["without_ttl"]}
    assert {k.workers(), k.models(), k.model_workers("echo")} <= permanent.keys()
    assert all(permanent.values()) and v["unexpected_keys_without_ttl"] == [] and v["keys_ok"] is True
    assert v["load_scores"] == 1 and v["nonzero_scores"] == [] and v["scores_ok"] is True
    assert v["ok"] is True
    md = "\n".join(render(data))
    assert "open loop at **10 req/s**" in md and "| no request fails | 0 errors, 200 of 200 complete | yes |" in md


def test_the_audit_flags_a_key_without_ttl_and_a_load_score_left_behind():
    k = Keys()
    with RedisServer() as server, Redis.from_url(server.url) as r:
        r.hset(k.workers(), "w1", "echo")
        r.zadd(k.models(), {"echo": 1})
        r.zadd(k.model_workers("echo"), {"w1": 0, "w2": 2})
        r.xadd(k.jobs("echo", "w2"), {"request_id": "x"})
        r.zadd("arq:abort", {"job": 1})
        r.set(k.worker("w1"), "alive", ex=10)
        r.set(f"{k.prefix}:stray:123", "left behind")  # no TTL, documented nowhere
        found = audit(r, k, ["echo"])
    assert [row["key"] for row in found["unexpected_without_ttl"]] == [f"{k.prefix}:stray:123"]
    assert {row["key"] for row in found["without_ttl"]} == {
        k.workers(), k.models(), k.model_workers("echo"), k.jobs("echo", "w2"), "arq:abort", f"{k.prefix}:stray:123"}
    assert found["nonzero_scores"] == [{"key": k.model_workers("echo"), "worker": "w2", "score": 2.0}]
    assert found["job_streams"] == [{"key": k.jobs("echo", "w2"), "length": 1}]


def test_growth_compares_the_largest_sample_after_the_warmup_with_the_one_at_its_end():
    points = [(0.0, 50.0), (10.0, 80.0), (20.0, 100.0), (30.0, 105.0), (40.0, 109.0), (50.0, 104.0)]
    assert growth(points, 20.0) == {"judged_from_s": 20.0, "first_mb": 50.0, "at_warmup_mb": 100.0,
                                   "max_after_mb": 109.0, "last_mb": 104.0, "growth": 0.09, "ok": True}
    assert growth(points[:-2] + [(40.0, 111.0)], 20.0)["ok"] is False
    assert growth(points, 50.0)["ok"] is None  # nothing after it: not judged
