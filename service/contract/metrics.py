"""Histograms every worker adds to and the API reads for ``/metrics``, kept in Redis.

Workers on any host observe; the API process exposes. Each histogram is one Redis hash per label
value, holding cumulative bucket counts (field ``le``), ``sum`` and ``count``, as Prometheus has
them.
"""

from __future__ import annotations

import math

from redis import Redis

BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, math.inf)
PREFIX = "prism:metrics"
HISTOGRAMS = {
    "queue_wait_seconds": "Time from submission to a worker starting the job",
    "phase_seconds": "Time a job spends in each phase of the engine, by phase",
    "run_seconds": "Time a worker spends on a job, from start to end",
}


def _key(name: str, label: str) -> str:
    return f"{PREFIX}:{name}:{label}"


def observe(redis: Redis, name: str, value: float, label: str = "") -> None:
    """Add one observation of ``name`` (for ``label``, e.g. a phase)."""
    key = _key(name, label)
    with redis.pipeline() as pipe:
        for bound in BUCKETS_S:
            if value <= bound:
                pipe.hincrby(key, repr(bound), 1)
        pipe.hincrbyfloat(key, "sum", value)
        pipe.hincrby(key, "count", 1)
        pipe.execute()


def read(redis: Redis, name: str) -> dict[str, tuple[list[tuple[str, float]], float]]:
    """Per label: the cumulative buckets as (``le``, count) and the sum of ``name``'s observations."""
    out = {}
    for key in redis.scan_iter(match=f"{_key(name, '')}*", count=100):
        label = key.decode().removeprefix(_key(name, ""))
        values = {k.decode(): float(v) for k, v in redis.hgetall(key).items()}
        buckets = [("+Inf" if b == math.inf else repr(float(b)), values.get(repr(b), 0.0)) for b in BUCKETS_S]
        out[label] = buckets, values.get("sum", 0.0)
    return out


COUNTERS = {
    "batches": "Batches submitted",
    "batch_items": "Items of batches, by outcome: submitted, skipped, then succeeded, failed or canceled",
}


def _counter_key(name: str) -> str:
    return f"{PREFIX}:counter:{name}"


def count(redis: Redis, name: str, label: str = "", n: int = 1) -> None:
    """Add ``n`` to the counter ``name`` (for ``label``)."""
    redis.hincrby(_counter_key(name), label, n)


def read_counter(redis: Redis, name: str) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in redis.hgetall(_counter_key(name)).items()}
