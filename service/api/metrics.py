"""``/metrics``: a Prometheus collector that reads the queue's state and the workers' histograms
from Redis at each scrape, so any number of API processes report the same numbers."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from redis import Redis
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from service.contract import metrics
from service.contract.jobs import job_queue
from service.contract.keys import alive_key
from service.contract.settings import Settings


def job_counts(redis: Redis, settings: Settings) -> dict[str, int]:
    """Jobs kept in Redis by status: the queue's list and RQ's registries (running = started)."""
    queue = job_queue(redis, settings)
    return {
        "queued": queue.count,
        "running": StartedJobRegistry(queue=queue).get_job_count(cleanup=False),
        "succeeded": FinishedJobRegistry(queue=queue).get_job_count(cleanup=False),
        "failed": FailedJobRegistry(queue=queue).get_job_count(cleanup=False),
        "canceled": CanceledJobRegistry(queue=queue).get_job_count(cleanup=False),
    }


class QueueCollector(Collector):
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    def collect(self) -> Iterator:
        counts = job_counts(self.redis, self.settings)
        jobs = GaugeMetricFamily("prism_jobs", "Jobs kept in Redis, by status", labels=["status"])
        for status, count in counts.items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily("prism_queue_depth", "Jobs waiting for a worker", value=counts["queued"])
        pattern = f"{alive_key(self.settings.queue_name, '')}*"
        live = sum(1 for _ in self.redis.scan_iter(match=pattern, count=100))
        yield GaugeMetricFamily("prism_live_workers", "Workers whose heartbeat has not expired", value=live)
        for name, documentation in metrics.HISTOGRAMS.items():
            labels = ["phase"] if name == "phase_seconds" else []
            family = HistogramMetricFamily(f"prism_{name}", documentation, labels=labels)
            for label, (buckets, total) in sorted(metrics.read(self.redis, name).items()):
                family.add_metric([label] if labels else [], buckets, total)
            yield family
        batches = metrics.read_counter(self.redis, "batches")
        yield CounterMetricFamily("prism_batches", metrics.COUNTERS["batches"], value=batches.get("", 0.0))
        items = CounterMetricFamily("prism_batch_items", metrics.COUNTERS["batch_items"], labels=["outcome"])
        counted = metrics.read_counter(self.redis, "batch_items")
        for outcome in ("submitted", "skipped", "succeeded", "failed", "canceled"):
            items.add_metric([outcome], counted.get(outcome, 0.0))
        yield items
