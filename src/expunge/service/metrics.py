"""``/metrics``: Prometheus figures. What the API process sees itself (HTTP calls, submission latency) is counted
as it happens; what the workers do is read from the database at each scrape, so that it is right whichever
process (or server) did the work."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .queue import APPLYING, QUEUED, Queue


class QueueCollector:
    """Queue depth, the oldest request's age and time left to its deadline, requests by status, batches and
    update seconds, per run."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def collect(self):
        now = time.time()
        depth = GaugeMetricFamily("expunge_queue_depth", "Requests queued or being applied", labels=["run", "status"])
        age = GaugeMetricFamily("expunge_queue_oldest_age_seconds", "Age of the oldest open request", labels=["run"])
        left = GaugeMetricFamily("expunge_queue_oldest_deadline_seconds",
                                 "Seconds until the oldest open request's deadline (negative: overdue)", labels=["run"])
        for run, d in self.queue.depth().items():
            depth.add_metric([run, QUEUED], d[QUEUED])
            depth.add_metric([run, APPLYING], d[APPLYING])
            age.add_metric([run], now - d["oldest_at"])
            left.add_metric([run], d["oldest_deadline_at"] - now)
        totals = GaugeMetricFamily("expunge_requests", "Requests received, by run and status", labels=["run", "status"])
        for (run, status), n in self.queue.totals().items():
            totals.add_metric([run, status], n)
        versions = CounterMetricFamily("expunge_batches_committed", "Batches that made a new version", labels=["run"])
        seconds = CounterMetricFamily("expunge_update_seconds", "Seconds spent computing updates", labels=["run"])
        for run, (n, s) in self.queue.update_totals().items():
            versions.add_metric([run], n)
            seconds.add_metric([run], s)
        yield from (depth, age, left, totals, versions, seconds)


class Metrics:
    """One registry per app (tests make several apps in one process)."""

    def __init__(self, queue: Queue):
        self.registry = CollectorRegistry()
        self.http = Counter("expunge_http_requests", "HTTP calls by route and status", ["method", "route", "status"],
                            registry=self.registry)
        self.submit_seconds = Histogram("expunge_submission_seconds", "Time to validate and commit a submission",
                                        registry=self.registry,
                                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.registry.register(QueueCollector(queue))
