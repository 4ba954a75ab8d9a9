"""Every use the worker makes of RQ below its documented API (rq==3.0.0), in one place.

RQ runs one job per dequeue (``perform_job``); a PRISM worker runs one job or several as one pass,
so it drives the steps of RQ's life of a job itself: mark jobs started, end them as RQ ends a job
it performed, or give them back to the queue. ``tests/worker/test_rq_adapter.py`` checks each hook
against the pinned RQ, so an upgrade that changes one fails there, not in production.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.timeouts import JobTimeoutException
from rq.utils import now


def take(worker: SimpleWorker, jobs: list[Job]) -> dict[str, Execution]:
    """Mark each job started under ``worker``'s name (out of the queue's intermediate list), as
    ``perform_job`` does for one, before any of them runs; their executions by job id."""
    executions = {job.id: worker.prepare_execution(job) for job in jobs}
    for job in jobs:
        worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
        job.started_at = now()
    return executions


def finish(worker: SimpleWorker, job: Job, queue: Queue, execution: Execution, outcome: Any) -> None:
    """End a job as RQ ends one it performed: its return value, or the exception that stopped it."""
    if isinstance(outcome, BaseException):
        worker._finalize_failure(job, queue, execution, (type(outcome), outcome, outcome.__traceback__))
    else:
        worker._finalize_success(job, queue, execution, outcome)


def give_back(worker: SimpleWorker, job: Job, queue: Queue, execution: Execution) -> None:
    """Put a job the worker holds back at the front of its queue, as if never taken: out of the
    started registry, neither failed nor counted as a lost worker's."""
    with worker.connection.pipeline() as pipeline:
        worker.cleanup_execution(job, pipeline=pipeline, execution=execution)
        pipeline.execute()
    queue.enqueue_job(job, at_front=True)


def mark_stopped(worker: SimpleWorker, job_id: str) -> None:
    """Have RQ end the job as stopped on request (canceled) rather than failed."""
    worker._stopped_job_id = job_id


def is_stopped(worker: SimpleWorker, job_id: str) -> bool:
    return worker._stopped_job_id == job_id


def result(job: Job) -> Any:
    """The return value RQ is saving for a job that succeeded."""
    return job._result


def time_limit(worker: SimpleWorker, seconds: int, job_id: str) -> AbstractContextManager:
    """RQ's timer for a job (SIGALRM in the main thread): raises ``JobTimeoutException`` after ``seconds``."""
    return worker.death_penalty_class(seconds, JobTimeoutException, job_id=job_id)
