"""Lost-job recovery: a job whose worker stopped heartbeating is re-queued or failed.

RQ notices a dead SimpleWorker only when its execution entry expires (job timeout + 60 s).
Workers here refresh ``prism:alive:<queue>:<worker>`` every few seconds, so a job in the started
registry whose worker key is gone belongs to a dead worker. The API (on every status read) and
every live worker (on each heartbeat) run this sweep; a per-execution lock makes it idempotent.
"""

from __future__ import annotations

import logging

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry

from service.contract.batches import job_ended
from service.contract.jobs import (
    ErrorCode,
    JobError,
    Progress,
    fetch_job,
    job_queue,
    read_failure,
    record_failure,
    save_progress,
)
from service.contract.keys import alive_key, recovery_lock
from service.contract.settings import Settings

log = logging.getLogger("prism.recovery")


def worker_lost(redis: Redis, settings: Settings, job: Job) -> bool:
    """The job is running on a worker whose heartbeat key has expired."""
    if job.get_status(refresh=False) != JobStatus.STARTED or not job.worker_name:
        return False
    return not redis.exists(alive_key(settings.queue_name, job.worker_name))


def recover_lost_jobs(redis: Redis, settings: Settings) -> list[str]:
    """Re-queue (up to ``max_requeues`` times) or fail the jobs of dead workers; returns their ids."""
    queue = job_queue(redis, settings)
    registry = StartedJobRegistry(queue=queue)
    handled = []
    for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
        try:
            job = fetch_job(redis, job_id)
        except NoSuchJobError:
            continue
        if not worker_lost(redis, settings, job):
            continue
        if not redis.set(recovery_lock(job_id, execution_id), 1, nx=True, ex=3600):
            continue
        redis.zrem(registry.key, f"{job_id}:{execution_id}")
        lost = int(job.meta.get("lost", 0)) + 1
        job.meta["lost"] = lost
        save_progress(job, Progress())
        if lost <= settings.max_requeues:
            queue.enqueue_job(job)
            log.warning("job %s: worker %s lost; re-queued", job_id, job.worker_name)
        else:
            message = "the worker running this job stopped; retries exhausted"
            record_failure(job, JobError(code=ErrorCode.worker_lost, message=message))
            job.set_status(JobStatus.FAILED)
            FailedJobRegistry(queue=queue).add(job, ttl=settings.job_ttl_s, exc_string="worker lost")
            error = read_failure(job).model_dump(mode="json")
            job_ended(redis, settings, job, {"status": "failed", "error": error})
            log.warning("job %s: worker %s lost; failed", job_id, job.worker_name)
        handled.append(job_id)
    return handled
