"""Lost-job recovery: a job whose worker stopped heartbeating is re-queued or failed.

RQ notices a dead SimpleWorker only when its execution entry expires (job timeout + 60 s).
Workers here refresh ``prism:alive:<queue>:<worker>`` every few seconds, so a job in the started
registry whose worker key is gone belongs to a dead worker. The API (on every status read) and
every live worker (on each heartbeat) run this sweep; a per-execution lock makes it idempotent.
"""

from __future__ import annotations

import logging

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from service.keys import alive_key
from service.settings import Settings

log = logging.getLogger("prism.recovery")


def recover_lost_jobs(redis: Redis, settings: Settings) -> list[str]:
    """Re-queue (up to ``max_requeues`` times) or fail the jobs of dead workers; returns their ids."""
    queue = Queue(settings.queue_name, connection=redis, serializer=JSONSerializer)
    registry = StartedJobRegistry(queue=queue)
    handled = []
    for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
        try:
            job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        except NoSuchJobError:
            continue
        if job.get_status(refresh=False) != JobStatus.STARTED:
            continue
        if job.worker_name and redis.exists(alive_key(settings.queue_name, job.worker_name)):
            continue
        if not redis.set(f"prism:recover:{job_id}:{execution_id}", 1, nx=True, ex=3600):
            continue
        redis.zrem(registry.key, f"{job_id}:{execution_id}")
        lost = int(job.meta.get("lost", 0)) + 1
        job.meta["lost"] = lost
        job.meta["progress"] = {}
        if lost <= settings.max_requeues:
            job.save_meta()
            queue.enqueue_job(job)
            log.warning("job %s: worker %s lost; re-queued", job_id, job.worker_name)
        else:
            job.meta["error"] = {
                "code": "worker_lost",
                "message": "the worker running this job stopped; retries exhausted",
            }
            job.save_meta()
            job.set_status(JobStatus.FAILED)
            FailedJobRegistry(queue=queue).add(job, ttl=settings.job_ttl_s, exc_string="worker lost")
            log.warning("job %s: worker %s lost; failed", job_id, job.worker_name)
        handled.append(job_id)
    return handled
