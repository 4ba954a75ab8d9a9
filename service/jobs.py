"""The API's side of the queue: store inputs, enqueue jobs, read status and result files.

Torch-free. Job arguments are JSON (never pickle) and carry a Redis key, not image bytes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer

from service.schemas import FILE_NAMES, JobError, JobLinks, JobResult, JobState, JobStatus, Progress
from service.settings import Settings

TASK = "worker.tasks.run_counterfactual"
ALIVE_PREFIX = "prism:alive:"


def input_key(job_id: str) -> str:
    return f"prism:input:{job_id}"


def output_key(job_id: str, name: str) -> str:
    return f"prism:output:{job_id}:{name}"


def alive_key(queue_name: str, worker_name: str) -> str:
    """Heartbeat key of a worker serving ``queue_name``; it expires when the worker stops beating."""
    return f"{ALIVE_PREFIX}{queue_name}:{worker_name}"


def links(job_id: str, with_files: bool = False) -> JobLinks:
    files = {name: f"/jobs/{job_id}/files/{name}" for name in FILE_NAMES} if with_files else {}
    return JobLinks(self=f"/jobs/{job_id}", files=files)


_STATES: dict[str, JobState] = {
    RQStatus.QUEUED: "queued",
    RQStatus.DEFERRED: "queued",
    RQStatus.SCHEDULED: "queued",
    RQStatus.STARTED: "running",
    RQStatus.FINISHED: "succeeded",
    RQStatus.FAILED: "failed",
    RQStatus.STOPPED: "failed",
    RQStatus.CANCELED: "canceled",
}


@dataclass
class JobStore:
    redis: Redis
    settings: Settings

    @property
    def queue(self) -> Queue:
        return Queue(self.settings.queue_name, connection=self.redis, serializer=JSONSerializer)

    def submit(self, image: bytes, request: dict) -> str:
        """Store the input under a TTL'd key and enqueue a job that refers to it."""
        job_id = uuid.uuid4().hex
        ttl = self.settings.job_ttl_s
        self.redis.set(input_key(job_id), image, ex=ttl)
        self.queue.enqueue_call(
            TASK,
            kwargs={"input_key": input_key(job_id), "request": request},
            job_id=job_id,
            timeout=self.settings.job_timeout_s,
            result_ttl=ttl,
            failure_ttl=ttl,
            ttl=ttl,
            description="prism counterfactual",
        )
        return job_id

    def _fetch(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None

    def status(self, job_id: str) -> JobStatus | None:
        job = self._fetch(job_id)
        if job is None:
            return None
        state = _STATES.get(job.get_status(refresh=False), "queued")
        meta = job.get_meta(refresh=False)
        result = error = None
        if state == "succeeded":
            value = job.return_value() or {}
            if "error" in value:
                state, error = "failed", JobError(**value["error"])
            else:
                result = JobResult(**value["result"], files=links(job_id, True).files)
        elif state == "failed":
            error = self._failure(job)
        return JobStatus(
            id=job_id,
            status=state,
            progress=Progress(**meta.get("progress", {})),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.ended_at,
            result=result,
            error=error,
            links=links(job_id, with_files=result is not None),
        )

    @staticmethod
    def _failure(job: Job) -> JobError:
        latest = job.latest_result()
        text = (latest.exc_string or "") if latest else ""
        if "JobTimeoutException" in text:
            return JobError(code="timeout", message="the job exceeded its time limit")
        return JobError(code="internal_error", message=f"the worker failed on this job; its log has job id {job.id}")

    def file(self, job_id: str, name: str) -> bytes | None:
        if name not in FILE_NAMES:
            return None
        return self.redis.get(output_key(job_id, name))

    def live_workers(self) -> int:
        """Workers whose heartbeat key has not expired (no registry cleanup involved)."""
        pattern = f"{alive_key(self.settings.queue_name, '')}*"
        return sum(1 for _ in self.redis.scan_iter(match=pattern, count=100))
