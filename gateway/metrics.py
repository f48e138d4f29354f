"""Prometheus metrics of one gateway process, on its own registry (no process-global state).

Counts that the broker already keeps (dispatch decisions, janitor work, dead
letters) are read at scrape time rather than counted twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.client import BrokerClient

M = TypeVar("M", Counter, Histogram)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self, broker: BrokerClient) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("redserve_gateway_requests", "HTTP requests answered, by route, model and status.",
                                ["route", "model", "status"], registry=r)
        self.ttft = Histogram("redserve_gateway_time_to_first_token_seconds",
                              "From dispatch to the first reply message of a generation.", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("redserve_gateway_inter_token_latency_seconds",
                             "Between consecutive reply messages of a stream (a message may carry several tokens).",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("redserve_gateway_generated_tokens", "Completion tokens delivered.", ["model"],
                              registry=r)
        self.log_misses = Counter("redserve_conversation_log_misses", "Conversation log entries that could not be "
                                  "written (the requests themselves succeeded).", registry=r)
        r.register(_BrokerCollector(broker))
        #: Labelled children by label values: ``labels()`` takes a lock and builds a key on every call, and each
        #: streamed request would make four such calls. Bounded as the label values are (see MetricsMiddleware).
        self._children: dict[tuple[str, ...], Any] = {}

    def child(self, metric: M, *values: str) -> M:
        """``metric.labels(*values)``, made once."""
        key = (str(id(metric)), *values)
        found: M | None = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BrokerCollector:
    def __init__(self, broker: BrokerClient) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily("redserve_dispatch_decisions", "Dispatch attempts by method and outcome.",
                                        labels=["method", "outcome"])
        for (method, outcome), n in sorted(self.broker.dispatcher.decisions.items()):
            decisions.add_metric([method, outcome], n)
        yield decisions
        janitor = self.broker.janitor
        reclaimed = CounterMetricFamily("redserve_janitor_reclaimed_jobs",
                                        "Jobs of dead workers: moved (never started), lost (were running), dropped.",
                                        labels=["action"])
        for action in ("moved", "lost", "dropped"):
            reclaimed.add_metric([action], getattr(janitor, action) if janitor else 0)
        yield reclaimed
        yield CounterMetricFamily("redserve_dead_lettered_jobs", "Jobs given up on after max_attempts.",
                                  value=self.broker.dead_lettered)


class MetricsMiddleware:
    """Counts every API response by route, model and status.

    Only values the system knows become labels, so untrusted input cannot grow the series: the route's
    template (or ``unmatched``), the model only once a dispatch found it live (set by the route on
    request.state), else ``unknown``.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/v1/") or path == "/tokenize"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            model = scope.get("state", {}).get("model", "unknown")
            self.metrics.child(self.metrics.requests, name, model, str(status)).inc()


def since(start: float) -> float:
    return time.perf_counter() - start
