"""The API's side of the queue: store inputs in the blob store, enqueue jobs, read status and result
files. Torch-free."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from redis import Redis
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus

from models.request.report import FILE_NAMES, EditReport
from models.request.resolve import ResolvedEdit
from service.api.errors import FilesGone, IdempotencyConflict, NotCancelable, QueueFull, StorageFull
from service.api.schemas import JobLinks, JobResult, JobState, JobStatus, Prompts
from service.contract.batches import job_ended
from service.contract.blobs import BlobMissing, BlobStore, file_blob, input_blob, mask_blob
from service.contract.jobs import (
    JobRequest,
    enqueue,
    fetch_job,
    job_edit,
    job_queue,
    read_failure,
    read_progress,
)
from service.contract.keys import alive_key, cancel_key, idempotency_key, jobs_index_key
from service.contract.recovery import recover_lost_jobs, worker_lost
from service.contract.settings import Settings

JOB_ID = re.compile(r"[0-9a-f]{32}")
JOB_RECORD_BYTES = 16 * 1024
"""What one job may come to hold in Redis, its record and its result (measured: 10.8 KiB a job over a
200-item batch of 2000 x 2500 studies, docs/bench/batch/study-size)."""

STATES: dict[str, JobState] = {
    RQStatus.QUEUED: "queued",
    RQStatus.DEFERRED: "queued",
    RQStatus.SCHEDULED: "queued",
    RQStatus.STARTED: "running",
    RQStatus.FINISHED: "succeeded",
    RQStatus.FAILED: "failed",
    RQStatus.STOPPED: "canceled",
    RQStatus.CANCELED: "canceled",
}


def links(job_id: str, report: EditReport | None = None) -> JobLinks:
    """The job's own link and, once it has a report, one per result file it wrote."""
    names = () if report is None else report.file_names
    return JobLinks(self=f"/jobs/{job_id}", files={name: f"/jobs/{job_id}/files/{name}" for name in names})


@dataclass
class JobStore:
    redis: Redis
    settings: Settings
    blobs: BlobStore

    def submit(
        self,
        image: bytes,
        request: JobRequest,
        edit: ResolvedEdit,
        owner: str,
        client_key: str | None = None,
        mask: bytes | None = None,
    ) -> str:
        """Store the input (and an anatomy mask) in the blob store and enqueue a job that refers to
        them and runs ``edit``, what ``request`` was resolved to.

        With an Idempotency-Key (``client_key``), a repeat of the same request returns the first
        job's id; a request refused on the way (queue full, storage full) unbinds the key.
        """
        job_id = uuid.uuid4().hex
        if client_key is not None:
            digest = hashlib.sha256(image + (mask or b"") + request.model_dump_json().encode()).hexdigest()
            if (existing := self.claim(owner, client_key, job_id, digest)) is not None:
                return existing
        try:
            if self.queue_room() < 1:
                raise QueueFull(self.settings.retry_after_s)
            self.check_storage(1)
            self.add(job_id, image, request, edit, owner, mask)
        except Exception:
            self.release(owner, client_key)
            raise
        return job_id

    def claim(self, owner: str, client_key: str, new_id: str, digest: str) -> str | None:
        """Bind the owner's Idempotency-Key to ``new_id`` and None; or, if it is bound already, the
        id it is bound to when ``digest`` (of the request's content) is the same, else 409."""
        key = idempotency_key(owner, client_key)
        if self.redis.set(key, f"{new_id}:{digest}", nx=True, ex=self.settings.job_ttl_s):
            return None
        existing_id, _, existing_digest = (self.redis.get(key) or b"").decode().partition(":")
        if existing_digest != digest:
            raise IdempotencyConflict
        return existing_id

    def release(self, owner: str, client_key: str | None) -> None:
        """Unbind a key whose request was refused, so that its retry is a new request."""
        if client_key is not None:
            self.redis.delete(idempotency_key(owner, client_key))

    def check_storage(self, jobs: int) -> None:
        """503 before anything is written when Redis, at its ``maxmemory`` (with ``noeviction``,
        which refuses writes rather than evicting the queue), has no room for ``jobs`` more jobs."""
        memory = self.redis.info("memory")
        limit = int(memory.get("maxmemory", 0))
        if limit and limit - int(memory["used_memory"]) < jobs * JOB_RECORD_BYTES:
            room = max(0, (limit - int(memory["used_memory"])) // JOB_RECORD_BYTES)
            message = f"storage full: the queue's Redis has room for {room} more jobs, not {jobs}; retry later"
            raise StorageFull(self.settings.retry_after_s, message)

    def queue_room(self) -> int:
        """How many more jobs the queue takes before POSTs answer 503."""
        return self.settings.max_queue_depth - job_queue(self.redis, self.settings).count

    def add(
        self,
        job_id: str,
        image: bytes,
        request: JobRequest,
        edit: ResolvedEdit,
        owner: str,
        mask: bytes | None = None,
        batch: str | None = None,
    ) -> None:
        """Store the input (and mask) in the blob store, list the job among the owner's and
        enqueue it, last: a write that Redis or the store refuses leaves no job to run, and its
        blobs are deleted again (else swept); an index entry without a job leaves at the next list."""
        ttl = self.settings.job_ttl_s
        self.blobs.put(input_blob(job_id), image)
        try:
            if mask is not None:
                self.blobs.put(mask_blob(job_id), mask)
            with self.redis.pipeline() as pipe:
                pipe.zadd(jobs_index_key(owner), {job_id: time.time()})
                pipe.expire(jobs_index_key(owner), ttl)
                pipe.execute()
            queue = job_queue(self.redis, self.settings)
            enqueue(queue, job_id, request, edit, owner, self.settings, with_mask=mask is not None, batch=batch)
        except Exception:
            self.blobs.delete([input_blob(job_id), mask_blob(job_id)])
            raise

    def remove(self, job_id: str) -> None:
        """Take back a job that was enqueued as part of a request refused later (a batch that did
        not fit): its record, its place in the queue and its blobs."""
        try:
            job = fetch_job(self.redis, job_id)
        except NoSuchJobError:
            return
        job.delete(remove_from_queue=True)
        self.blobs.delete([input_blob(job_id), mask_blob(job_id)])

    def list(self, owner: str, limit: int, offset: int) -> tuple[list[JobStatus], int]:
        """A page of the owner's jobs, newest first, and how many are kept; expired jobs leave the index."""
        index = jobs_index_key(owner)
        statuses = []
        for raw in self.redis.zrevrange(index, offset, offset + limit - 1):
            status = self.status(raw.decode(), owner)
            if status is None:
                self.redis.zrem(index, raw)
            else:
                statuses.append(status)
        return statuses, int(self.redis.zcard(index))

    def _fetch(self, job_id: str, owner: str) -> Job | None:
        """The job, or None if it does not exist or belongs to another tenant."""
        if not JOB_ID.fullmatch(job_id):
            return None
        try:
            job = fetch_job(self.redis, job_id)
        except NoSuchJobError:
            return None
        return job if job.meta.get("owner") == owner else None

    def status(self, job_id: str, owner: str) -> JobStatus | None:
        job = self._fetch(job_id, owner)
        if job is None:
            return None
        if worker_lost(self.redis, self.settings, job):
            recover_lost_jobs(self.redis, self.settings)
            job = self._fetch(job_id, owner)
        state = STATES.get(job.get_status(refresh=False), "queued")
        result = error = report = None
        if state == "succeeded":
            report = EditReport.model_validate(job.return_value())
            result = JobResult(**dict(report), files=links(job_id, report).files)
        elif state == "failed":
            error = read_failure(job)
        edit = job_edit(job)
        return JobStatus(
            id=job_id,
            status=state,
            prompts=Prompts(original_prompt=edit.original_prompt, edit_prompt=edit.edit_prompt),
            progress=read_progress(job),
            requeues=min(int(job.meta.get("lost", 0)), self.settings.max_requeues),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.ended_at,
            result=result,
            error=error,
            links=links(job_id, report),
        )

    def cancel(self, job_id: str, owner: str) -> JobStatus | None:
        """Remove a queued job, or flag a running one (its worker stops within one step). A queued
        job is flagged too: a worker that took it a moment before ends it canceled, unstarted."""
        job = self._fetch(job_id, owner)
        if job is None:
            return None
        status = job.get_status()
        if status in (RQStatus.QUEUED, RQStatus.DEFERRED, RQStatus.SCHEDULED):
            self.redis.set(cancel_key(job_id), 1, ex=self.settings.job_ttl_s)
            try:
                job.cancel()
            except InvalidJobOperation:  # a worker took it meanwhile, saw the flag and ended it
                return self.status(job_id, owner)
            self.blobs.delete([input_blob(job_id), mask_blob(job_id)])
            job_ended(self.redis, self.settings, job, {"status": "canceled"})
        elif status == RQStatus.STARTED:
            self.redis.set(cancel_key(job_id), 1, ex=self.settings.job_ttl_s)
        elif STATES.get(status) != "canceled":
            raise NotCancelable
        return self.status(job_id, owner)

    def file(self, job_id: str, name: str, owner: str) -> tuple[int, Iterator[bytes]] | None:
        """A result file's size and content, streamed from the blob store; None when the job (or
        the file, for this job) does not exist; :class:`FilesGone` when the job has it but the
        store no longer does."""
        job = self._fetch(job_id, owner)
        if name not in FILE_NAMES or job is None or job.get_status(refresh=False) != RQStatus.FINISHED:
            return None
        report = job.return_value()
        if report is None or name not in EditReport.model_validate(report).file_names:
            return None
        try:
            return self.blobs.open(file_blob(job_id, name))
        except BlobMissing:
            raise FilesGone from None

    def live_workers(self) -> int:
        """Workers whose heartbeat key has not expired (no registry cleanup involved)."""
        pattern = f"{alive_key(self.settings.queue_name, '')}*"
        return sum(1 for _ in self.redis.scan_iter(match=pattern, count=100))
