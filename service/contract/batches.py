"""Batches: many jobs submitted as one, and how their end is noticed.

A batch is a record in Redis (its items, each with its job id or why it was skipped) and ordinary
jobs, one per item, that carry ``meta["batch"]``: every worker serves them as it serves any job.
Whoever ends a job (the worker, the cancel of a queued job, the recovery sweep) calls
:func:`job_ended`, which sends the job's own webhook and, after a batch's last job, the batch's
``batch.completed`` webhook, once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from redis import Redis
from rq.job import Job

from service.contract import metrics
from service.contract.keys import batch_done_key, batch_ended_key, batch_key
from service.contract.settings import Settings
from service.contract.webhooks import event, notify, notify_job

ENDED = ("succeeded", "failed", "canceled")


class BatchItem(BaseModel):
    """One manifest row: the job that runs it, or why it does not run."""

    model_config = ConfigDict(frozen=True)

    line: Annotated[int, Field(description="its line in the manifest (the header is line 1)")]
    path: Annotated[str, Field(description="the image's name in the ZIP")]
    job_id: str | None = None
    skipped: Annotated[str | None, Field(description="why the row does not apply to the edit")] = None


class BatchRecord(BaseModel):
    """What a batch is, kept under the job TTL."""

    id: str
    owner: str
    created_at: datetime
    items: list[BatchItem]
    webhook: str | None = None

    @property
    def job_ids(self) -> list[str]:
        return [item.job_id for item in self.items if item.job_id is not None]


def links(batch_id: str) -> dict[str, str]:
    return {"self": f"/batches/{batch_id}", "dataset": f"/batches/{batch_id}/dataset.zip"}


def save_batch(redis: Redis, settings: Settings, record: BatchRecord) -> None:
    redis.set(batch_key(record.id), record.model_dump_json(), ex=settings.job_ttl_s)


def load_batch(redis: Redis, batch_id: str) -> BatchRecord | None:
    raw = redis.get(batch_key(batch_id))
    return None if raw is None else BatchRecord.model_validate_json(raw)


def ended_counts(redis: Redis, batch_id: str) -> dict[str, int]:
    """How the batch's ended jobs ended, by state."""
    counts = dict.fromkeys(ENDED, 0)
    for state in redis.hvals(batch_ended_key(batch_id)):
        counts[state.decode()] += 1
    return counts


def check_completed(redis: Redis, settings: Settings, record: BatchRecord) -> None:
    """Send ``batch.completed`` if every job of the batch has ended and nobody sent it yet."""
    counts = ended_counts(redis, record.id)
    if sum(counts.values()) < len(record.job_ids):
        return
    if not redis.set(batch_done_key(record.id), 1, nx=True, ex=settings.job_ttl_s):
        return
    if record.webhook:
        skipped = len(record.items) - len(record.job_ids)
        data = {"id": record.id, "counts": {**counts, "skipped": skipped}, "links": links(record.id)}
        notify(redis, settings, record.owner, record.webhook, event("completed", data, subject="batch"))


def job_ended(redis: Redis, settings: Settings, job: Job, data: dict[str, Any]) -> None:
    """A job has ended with ``data`` (its ``status`` and result or error): its webhook, and its
    batch's accounting. Idempotent per job: a job is counted in its batch once."""
    notify_job(redis, settings, job, "completed", data)
    batch_id = job.meta.get("batch")
    if not batch_id:
        return
    ended = batch_ended_key(batch_id)
    if not redis.hsetnx(ended, job.id, data["status"]):
        return
    redis.expire(ended, settings.job_ttl_s)
    metrics.count(redis, "batch_items", data["status"])
    record = load_batch(redis, batch_id)
    if record is not None:
        check_completed(redis, settings, record)
