"""``prism worker``: a long-lived RQ SimpleWorker that loads the model bundle once.

RQ's default worker forks a child per job, which cannot reuse a CUDA model; SimpleWorker runs
jobs in-process. One worker per GPU (choose it with CUDA_VISIBLE_DEVICES); any number of
workers on any hosts may serve one Redis. A heartbeat thread keeps a short-lived
``prism:alive:<queue>:<name>`` key so the API can tell live workers from dead ones within seconds.
With ``PRISM_WORKER_BATCH`` > 1 a worker runs compatible queued jobs as one batch
(``worker.batching``), each job keeping RQ's life of a job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid
from datetime import UTC, datetime
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.registry import CanceledJobRegistry, FailedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker import WorkerStatus

from service.contract import metrics
from service.contract.batches import job_ended
from service.contract.blobs import StorageUnavailable, sweep
from service.contract.jobs import ErrorCode, job_queue, read_failure, record_failure
from service.contract.keys import SWEEP_LOCK, alive_key
from service.contract.recovery import recover_lost_jobs
from service.contract.settings import Settings
from worker import tasks
from worker.batching import claim_companions
from worker.loading import bundle_from_settings, classifier_from_settings
from worker.runner import JobCanceled, JobRunner, Outcome, failure_of

log = logging.getLogger("prism.worker")


class PrismWorker(SimpleWorker):
    """SimpleWorker with JSON job arguments, no job descriptions in logs, a liveness key, and
    every failure recorded as the job's :class:`~service.contract.jobs.JobError`."""

    def __init__(self, queues, *, runner: JobRunner, settings: Settings, **kwargs) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        super().__init__(queues, log_job_description=False, **kwargs)
        tasks.install(runner)
        self.runner = runner
        self.settings = settings
        self.heartbeat_s = settings.worker_heartbeat_s
        self._alive = threading.Event()
        self.stopping = False

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job, with up to ``PRISM_WORKER_BATCH`` - 1 queued jobs that can share its batch."""
        companions = claim_companions(self.connection, queue, job, self.settings.worker_batch - 1)
        if not companions:
            super().execute_job(job, queue)
            return
        self._execute_batch([job, *companions], queue)
        self.set_state(WorkerStatus.IDLE)

    def _execute_batch(self, jobs: list[Job], queue: Queue) -> None:
        """RQ's life of a job (execution, started, finished or failed), for several jobs at once.

        All are marked started under this worker's name before any work, so the recovery sweep
        re-queues every one of them if the worker dies. A canceled job is finished as it leaves
        the batch; the others once the batch ends. The time limit is the jobs' own, counted from
        the batch's start (they start together); exceeding it, or any fault of the batch as a
        whole, fails every job still in it with that reason."""
        executions = {job.id: self.prepare_execution(job) for job in jobs}
        for job in jobs:
            self.prepare_job_execution(job, remove_from_intermediate_queue=True)
            job.started_at = now()
        log.info("batch of %d jobs: %s", len(jobs), ", ".join(job.id for job in jobs))
        outcomes: dict[str, Outcome] = {}

        def ended(job: Job, outcome: Outcome) -> None:
            if isinstance(outcome, JobCanceled):
                self._finalize(job, queue, executions[job.id], outcome)
            outcomes[job.id] = outcome

        timeout = min(job.timeout or queue.DEFAULT_TIMEOUT for job in jobs)
        try:
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=jobs[0].id):
                self.runner.run_batch(jobs, ended)
        except Exception as exc:  # the whole batch stops: each job still in it ends with the reason
            for job in jobs:
                outcomes.setdefault(job.id, exc)
        for job in jobs:
            if not isinstance(outcomes[job.id], JobCanceled):
                self._finalize(job, queue, executions[job.id], outcomes[job.id])

    def _finalize(self, job: Job, queue: Queue, execution: Execution, outcome: Outcome) -> None:
        """End a job of a batch as RQ ends one it performed: its result, or its exception."""
        if isinstance(outcome, BaseException):
            self._finalize_failure(job, queue, execution, (type(outcome), outcome, outcome.__traceback__))
        else:
            self._finalize_success(job, queue, execution, outcome)

    def request_stop(self, signum, frame) -> None:
        """SIGTERM/SIGINT: finish the current job, then leave for good (no reconnect)."""
        self.stopping = True
        super().request_stop(signum, frame)

    def handle_exception(self, job: Job, *exc_info) -> None:
        """Record why the job ended. A cancellation is RQ's "stopped on request" (not a failure);
        expected failures are logged in one line, unexpected ones with the frames of their
        traceback. RQ's own handler is not used: it logs the job's arguments (the prompts) and
        the exception's message."""
        exc = exc_info[1]
        if isinstance(exc, JobCanceled):
            self._stopped_job_id = job.id
            log.info("job %s: canceled", job.id)
            return
        error = failure_of(exc, job.id)
        record_failure(job, error)
        if error.code is ErrorCode.internal:
            log.error(
                "job %s: failed with %s\n%s", job.id, type(exc).__name__, "".join(traceback.format_tb(exc_info[2]))
            )
        else:
            log.warning("job %s: failed (%s)", job.id, error.code)

    def handle_job_success(self, job: Job, queue, started_job_registry, execution) -> None:
        super().handle_job_success(job, queue, started_job_registry, execution)
        self._ended(job, {"status": "succeeded", "result": job._result})

    def handle_job_failure(self, job: Job, queue, started_job_registry=None, exc_string="", execution=None) -> None:
        canceled = self._stopped_job_id == job.id
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        if canceled:
            # RQ files a job stopped on request under failed; /metrics and alerts count it as canceled
            with self.connection.pipeline() as pipe:
                FailedJobRegistry(queue=queue).remove(job, pipeline=pipe)
                CanceledJobRegistry(queue=queue).add(job, ttl=self.settings.job_ttl_s, pipeline=pipe)
                pipe.execute()
            self._ended(job, {"status": "canceled"})
        else:
            self._ended(job, {"status": "failed", "error": read_failure(job).model_dump(mode="json")})

    def _ended(self, job: Job, data: dict) -> None:
        """Run-time metric and the ``completed`` webhook of a job that ended on this worker."""
        try:
            if job.started_at is not None:
                elapsed = (datetime.now(UTC) - job.started_at.replace(tzinfo=UTC)).total_seconds()
                metrics.observe(self.connection, "run_seconds", elapsed)
            job_ended(self.connection, self.settings, job, data)
        except RedisError:
            log.warning("job %s: could not record its end (Redis unreachable)", job.id)

    @property
    def alive_key(self) -> str:
        return alive_key(self.queues[0].name, self.name)

    def _beat(self) -> None:
        """Refresh the liveness key, and re-queue jobs of workers that stopped beating."""
        while not self._alive.wait(self.heartbeat_s):
            try:
                self._mark_alive()
                recover_lost_jobs(self.connection, self.settings)
            except RedisError:
                log.warning("heartbeat failed (Redis unreachable); retrying")

    def _sweep(self) -> None:
        """Delete the blobs of jobs Redis no longer has, in a thread of its own (listing a large
        store must not delay the heartbeat); one worker of all sweeps per period."""
        while not self._alive.wait(self.settings.blob_sweep_s):
            try:
                if self.connection.set(SWEEP_LOCK, self.name, nx=True, ex=self.settings.blob_sweep_s):
                    sweep(self.connection, self.runner.blobs)
            except (RedisError, StorageUnavailable) as exc:
                log.warning("blob sweep skipped (%s); the next period tries again", type(exc).__name__)

    def _mark_alive(self) -> None:
        """The liveness key in Redis, then the heartbeat file: the file is fresh only while Redis is."""
        self.connection.set(self.alive_key, os.getpid(), ex=3 * self.heartbeat_s)
        if self.settings.worker_heartbeat_file:
            Path(self.settings.worker_heartbeat_file).touch()

    def work(self, *args, **kwargs) -> bool:
        self._mark_alive()
        threading.Thread(target=self._beat, name="prism-heartbeat", daemon=True).start()
        threading.Thread(target=self._sweep, name="prism-sweep", daemon=True).start()
        try:
            return super().work(*args, **kwargs)
        finally:
            self._alive.set()
            try:
                self.connection.delete(self.alive_key)
            except RedisError:
                log.warning("could not remove the liveness key; it expires by itself")


def run_worker(settings: Settings, burst: bool = False) -> None:
    start = time.perf_counter()
    bundle = bundle_from_settings(settings)
    log.info(
        "model %s loaded on %s (%s) in %.1f s",
        bundle.identity,
        bundle.device,
        bundle.dtype,
        time.perf_counter() - start,
    )
    redis = Redis.from_url(settings.redis_url)
    queue = job_queue(redis, settings)
    runner = JobRunner(bundle, settings, classifier_from_settings(settings))
    delay = 1.0
    while True:
        worker = PrismWorker(
            [queue],
            connection=redis,
            runner=runner,
            settings=settings,
            name=f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}",
            default_result_ttl=settings.job_ttl_s,
        )
        try:
            worker.work(burst=burst, with_scheduler=False)
        except RedisError:
            log.warning("lost Redis")
        if burst or worker.stopping:
            return
        log.warning("worker loop ended without a stop request; reconnecting in %.0f s", delay)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
