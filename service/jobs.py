"""The API's side of the queue: store inputs, enqueue jobs, read status and result files.

Torch-free. Job arguments are JSON (never pickle) and carry a Redis key, not image bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer

from service.keys import alive_key, cancel_key, input_key, output_key
from service.recovery import recover_lost_jobs
from service.schemas import FILE_NAMES, JobError, JobLinks, JobResult, JobState, JobStatus, Progress
from service.settings import Settings

TASK = "worker.tasks.run_counterfactual"
JOB_ID = re.compile(r"[0-9a-f]{32}")


class QueueFull(Exception):
    """More jobs are waiting than ``max_queue_depth``."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused with a different request."""


class NotCancelable(Exception):
    """The job has already finished."""


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

    def submit(self, image: bytes, request: dict, owner: str, idempotency_key: str | None = None) -> str:
        """Store the input under a TTL'd key and enqueue a job that refers to it.

        With an ``idempotency_key``, a repeat of the same request returns the first job's id.
        """
        ttl = self.settings.job_ttl_s
        job_id = uuid.uuid4().hex
        if idempotency_key is not None:
            digest = hashlib.sha256(image + json.dumps(request, sort_keys=True).encode()).hexdigest()
            idem = f"prism:idem:{owner}:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"
            if not self.redis.set(idem, f"{job_id}:{digest}", nx=True, ex=ttl):
                existing_id, _, existing_digest = (self.redis.get(idem) or b"").decode().partition(":")
                if existing_digest != digest:
                    raise IdempotencyConflict
                return existing_id
        if self.queue.count >= self.settings.max_queue_depth:
            if idempotency_key is not None:
                self.redis.delete(idem)
            raise QueueFull
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
            meta={"owner": owner},
        )
        return job_id

    def _fetch(self, job_id: str, owner: str) -> Job | None:
        """The job, or None if it does not exist or belongs to another tenant."""
        if not JOB_ID.fullmatch(job_id):
            return None
        try:
            job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None
        return job if job.meta.get("owner") == owner else None

    def status(self, job_id: str, owner: str) -> JobStatus | None:
        job = self._fetch(job_id, owner)
        if job is None:
            return None
        if self._worker_lost(job):
            recover_lost_jobs(self.redis, self.settings)
            job = self._fetch(job_id, owner)
        state = _STATES.get(job.get_status(refresh=False), "queued")
        meta = job.get_meta(refresh=False)
        result = error = None
        if state == "succeeded":
            value = job.return_value() or {}
            if "error" in value:
                state, error = "failed", JobError(**value["error"])
            elif value.get("canceled"):
                state = "canceled"
            else:
                result = JobResult(**value["result"], files=links(job_id, True).files)
        elif state == "failed":
            error = JobError(**meta["error"]) if "error" in meta else self._failure(job)
        return JobStatus(
            id=job_id,
            status=state,
            progress=Progress(**meta.get("progress", {})),
            requeues=min(int(meta.get("lost", 0)), self.settings.max_requeues),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.ended_at,
            result=result,
            error=error,
            links=links(job_id, with_files=result is not None),
        )

    def _worker_lost(self, job: Job) -> bool:
        if job.get_status(refresh=False) != RQStatus.STARTED or not job.worker_name:
            return False
        return not self.redis.exists(alive_key(self.settings.queue_name, job.worker_name))

    @staticmethod
    def _failure(job: Job) -> JobError:
        latest = job.latest_result()
        text = (latest.exc_string or "") if latest else ""
        if "JobTimeoutException" in text:
            return JobError(code="timeout", message="the job exceeded its time limit")
        return JobError(code="internal_error", message=f"the worker failed on this job; its log has job id {job.id}")

    def cancel(self, job_id: str, owner: str) -> JobStatus | None:
        """Remove a queued job, or flag a running one (its worker stops within one step)."""
        job = self._fetch(job_id, owner)
        if job is None:
            return None
        status = job.get_status()
        if status in (RQStatus.QUEUED, RQStatus.DEFERRED, RQStatus.SCHEDULED):
            job.cancel()
            self.redis.delete(input_key(job_id))
        elif status == RQStatus.STARTED:
            self.redis.set(cancel_key(job_id), 1, ex=self.settings.job_ttl_s)
        elif status != RQStatus.CANCELED:
            raise NotCancelable
        return self.status(job_id, owner)

    def file(self, job_id: str, name: str, owner: str) -> bytes | None:
        if name not in FILE_NAMES or self._fetch(job_id, owner) is None:
            return None
        return self.redis.get(output_key(job_id, name))

    def live_workers(self) -> int:
        """Workers whose heartbeat key has not expired (no registry cleanup involved)."""
        pattern = f"{alive_key(self.settings.queue_name, '')}*"
        return sum(1 for _ in self.redis.scan_iter(match=pattern, count=100))
