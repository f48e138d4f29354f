"""Prometheus metrics of one worker, read from its own state at scrape time.

A worker already counts what matters in its record (jobs, tokens, queue
length); exporting those costs the hot path nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from workers.base import BaseModelWorker


class WorkerCollector:
    def __init__(self, worker: BaseModelWorker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        rec = self.worker.record
        labels = ["worker", "engine"]
        values = [rec.id, rec.engine]

        def family(cls: type, name: str, doc: str, value: float) -> Metric:
            m = cls(name, doc, labels=labels)
            m.add_metric(values, value)
            return m

        yield family(CounterMetricFamily, "redserve_worker_jobs", "Jobs finished (any outcome).", rec.jobs_done)
        yield family(CounterMetricFamily, "redserve_worker_generated_tokens", "Tokens generated.", rec.tokens_out)
        yield family(GaugeMetricFamily, "redserve_worker_running_jobs", "Jobs running now.", len(self.worker.tasks))
        yield family(GaugeMetricFamily, "redserve_worker_queue_length",
                     "Jobs running plus waiting in the worker's stream, as last reported to Redis.", rec.queue)
        yield family(GaugeMetricFamily, "redserve_worker_max_concurrency", "Jobs the worker runs at once.",
                     rec.max_concurrency)
        yield family(GaugeMetricFamily, "redserve_worker_draining", "1 while the worker drains.",
                     float(rec.status == "draining"))
        if (outbox := self.worker.outbox) is not None:  # the ratio of these two is the outbox's batching
            yield family(CounterMetricFamily, "redserve_worker_reply_messages", "Reply messages published.",
                         outbox.messages)
            yield family(CounterMetricFamily, "redserve_worker_reply_commands",
                         "Redis commands that carried them (PUBLISH of a bundle, or EVALSHA of a logged message).",
                         outbox.commands)


def serve_metrics(worker: BaseModelWorker, host: str, port: int) -> int:
    """Expose /metrics on ``host:port`` (0 = any free port) from a daemon thread; returns the port."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port
