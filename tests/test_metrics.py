"""Prometheus metrics on the gateway and on each worker, after real traffic."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_gateway_and_worker_metrics(stack, redis, keys):
    w = await stack.worker(worker_id="m1", echo_delay=0.01, metrics_port=0, max_queue=2)
    gw = await stack.gateway()
    client = gw.client()
    for _ in range(3):
        stream = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b"}],
                                                      stream=True, max_tokens=4)
        [c async for c in stream]
    async with httpx.AsyncClient(base_url=gw.url) as http:
        await http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        # Fill the worker's two-job queue with slower requests, then get a 429.
        slow = [asyncio.create_task(http.post("/v1/chat/completions", json={
            "model": "echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}, timeout=10))
            for _ in range(2)]
        await asyncio.sleep(0.02)
        busy = await http.post("/v1/chat/completions", json={"model": "echo",
                                                              "messages": [{"role": "user", "content": "x"}]})
        await asyncio.gather(*slow)
        text = (await http.get("/metrics")).text
        worker_text = (await http.get(f"http://127.0.0.1:{w.metrics_port}/metrics")).text
    m = samples(text)
    route = "/v1/chat/completions"
    assert value(m, "redserve_gateway_requests_total", route=route, model="echo", status="200") == 5
    assert value(m, "redserve_gateway_requests_total", route=route, model="unknown", status="404") == 1
    assert "nope" not in text  # a name from the body is not a label until a dispatch found it live
    assert busy.status_code == 429
    assert value(m, "redserve_gateway_requests_total", route=route, model="echo", status="429") == 1
    assert value(m, "redserve_gateway_time_to_first_token_seconds_count", model="echo") == 5
    assert value(m, "redserve_gateway_inter_token_latency_seconds_count", model="echo") >= 3 * 3
    assert value(m, "redserve_gateway_generated_tokens_total", model="echo") == 5 * 4
    assert value(m, "redserve_dispatch_decisions_total", method="shortest_queue", outcome="placed") == 5
    assert value(m, "redserve_dispatch_decisions_total", method="shortest_queue", outcome="busy") == 1
    assert value(m, "redserve_dispatch_decisions_total", method="shortest_queue", outcome="unknown_model") == 1
    assert ("redserve_janitor_reclaimed_jobs_total", (("action", "moved"),)) in m
    assert value(m, "redserve_dead_lettered_jobs_total") == 0
    wm = samples(worker_text)
    assert value(wm, "redserve_worker_jobs_total", worker="m1", engine="echo") == 5
    assert value(wm, "redserve_worker_generated_tokens_total", worker="m1", engine="echo") == 20
    assert value(wm, "redserve_worker_queue_length", worker="m1", engine="echo") == 0
    assert value(wm, "redserve_worker_running_jobs", worker="m1", engine="echo") == 0
    messages = value(wm, "redserve_worker_reply_messages_total", worker="m1", engine="echo")
    commands = value(wm, "redserve_worker_reply_commands_total", worker="m1", engine="echo")
    assert messages >= 5 and 0 < commands <= messages  # never more than one Redis command per message
