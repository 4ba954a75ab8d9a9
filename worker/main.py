"""``prism worker``: a long-lived RQ SimpleWorker that loads the model bundle once.

RQ's default worker forks a child per job, which cannot reuse a CUDA model; SimpleWorker runs
jobs in-process. One worker per GPU (``prism worker --devices``); any number of workers on any
hosts may serve one Redis. A heartbeat thread keeps a short-lived ``prism:alive:<queue>:<name>``
key so the API can tell live workers from dead ones within seconds.

One life of a job for one job and for several: a dequeued job runs with up to
``PRISM_WORKER_PACK`` - 1 compatible queued jobs (``worker.packing``) as one pass, a lone job
being a pass of one; RQ's steps of a job's life are driven through ``worker.rq_adapter``.

A worker outlives its Redis: it waits for it to come back (logging the outage once) and goes on.
SIGTERM or SIGINT stops it taking jobs; the jobs it holds finish within ``PRISM_STOP_GRACE_S``,
past which (or at a second signal) they go back to the queue for the next worker.
"""

from __future__ import annotations

import logging
import os
import signal
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
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from service.contract import metrics
from service.contract.batches import job_ended
from service.contract.blobs import StorageUnavailable, sweep
from service.contract.jobs import ErrorCode, fetch_job, job_queue, read_failure, record_failure
from service.contract.keys import SWEEP_LOCK, alive_key
from service.contract.recovery import recover_lost_jobs
from service.contract.settings import Settings
from worker import rq_adapter
from worker.loading import bundle_from_settings, classifier_from_settings
from worker.packing import claim_companions
from worker.runner import JobCanceled, JobRunner, Outcome, StopTaking, failure_of

log = logging.getLogger("prism.worker")
DUPLICATE_SIGNAL_S = 1.0
"""A second signal this soon after the first is the same stop (a terminal's Ctrl-C reaches the
worker and ``prism up``, which passes it on), not a request to force it."""
RECONNECT_MAX_S = 30.0
IDLE_WAIT_S = 5
"""How long an idle worker waits for a job in one call to Redis. A signal the kernel hands to one
of torch's threads is run by the main thread only once that call returns (Python runs handlers in
the main thread): with RQ's 405 s, a stop could wait minutes."""


class Outage:
    """Whether Redis is reachable, as this process last found it: logged once when it is lost and
    once when it is back, however many tries lie between."""

    def __init__(self) -> None:
        self.since: float | None = None
        self._lock = threading.Lock()

    def lost(self) -> None:
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                log.warning("lost Redis; waiting for it to come back (the heartbeat file goes stale meanwhile)")

    def back(self) -> None:
        with self._lock:
            if self.since is not None:
                log.warning("Redis is back after %.0f s", time.monotonic() - self.since)
                self.since = None

    def wait(self, redis: Redis, stop: threading.Event | None = None) -> bool:
        """Block until Redis answers (backing off to :data:`RECONNECT_MAX_S` between tries); False
        if ``stop`` was set first."""
        delay = 0.5
        while True:
            try:
                redis.ping()
            except RedisError:
                self.lost()
                if stop is not None and stop.wait(delay):
                    return False
                if stop is None:
                    time.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            self.back()
            return True


class _QuietReconnects(logging.Filter):
    """RQ logs every failed try to reach Redis while it waits to dequeue; :class:`Outage` says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "could not connect to Redis" not in record.getMessage()


class PrismWorker(SimpleWorker):
    """SimpleWorker with JSON job arguments, no job descriptions in logs, a liveness key, jobs
    run in passes of one or more, and every failure recorded as the job's
    :class:`~service.contract.jobs.JobError`."""

    def __init__(
        self, queues, *, runner: JobRunner, settings: Settings, outage: Outage | None = None, **kwargs
    ) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        super().__init__(queues, log_job_description=False, **kwargs)
        self.log.addFilter(_QuietReconnects())
        self.runner = runner
        self.settings = settings
        self.heartbeat_s = settings.worker_heartbeat_s
        self.outage = outage or Outage()
        self._alive = threading.Event()
        self.stopping = False
        self._stop_signalled_at = 0.0

    @property
    def dequeue_timeout(self) -> int:
        return IDLE_WAIT_S

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job with up to ``PRISM_WORKER_PACK`` - 1 queued jobs that can share its pass."""
        companions = claim_companions(self.connection, queue, job, self.settings.worker_pack - 1)
        self._run([job, *companions], queue)
        self.set_state(WorkerStatus.IDLE)

    def _run(self, jobs: list[Job], queue: Queue) -> None:
        """RQ's life of a job (execution, started, finished or failed), for one or more jobs.

        All are marked started under this worker's name before any work, so the recovery sweep
        re-queues every one of them if the worker dies. A canceled job is ended as it leaves the
        pass; the others once it ends. The pass may run for each job's time limit times the
        number of jobs (they share every step, so a pass of N takes at most N times one job);
        exceeding it, or any fault of the pass as a whole, fails every job still in it with that
        reason. A stop past its grace gives every job still in it back to the queue."""
        executions = rq_adapter.take(self, jobs)
        if len(jobs) > 1:
            log.info("pack of %d jobs: %s", len(jobs), ", ".join(job.id for job in jobs))
        outcomes: dict[str, Outcome] = {}

        def ended(job: Job, outcome: Outcome) -> None:
            if isinstance(outcome, JobCanceled):
                self._finish(job, queue, executions[job.id], outcome)
            outcomes[job.id] = outcome

        limit = max(job.timeout or queue.DEFAULT_TIMEOUT for job in jobs) * len(jobs)
        try:
            with rq_adapter.time_limit(self, limit, jobs[0].id):
                self.runner.run_pack(jobs, ended)
        except StopTaking:
            for job in jobs:
                if job.id not in outcomes:
                    self._give_back(job, queue, executions[job.id])
            return
        except Exception as exc:  # the whole pass stops: each job still in it ends with the reason
            for job in jobs:
                outcomes.setdefault(job.id, exc)
        for job in jobs:
            if not isinstance(outcomes[job.id], JobCanceled):
                self._finish(job, queue, executions[job.id], outcomes[job.id])

    def _finish(self, job: Job, queue: Queue, execution: Execution, outcome: Outcome) -> None:
        """End the job, waiting for Redis if it is away; a job that was re-queued meanwhile (its
        worker looked lost) is left to its new run, so it ends once. A job that succeeded drops
        its inputs once its end is recorded."""
        while True:
            try:
                rq_adapter.finish(self, job, queue, execution, outcome)
                if not isinstance(outcome, BaseException):
                    self.runner.drop_inputs(job)
                return
            except RedisError:
                if not self.outage.wait(self.connection):
                    return
                self._mark_alive()
                try:
                    current = fetch_job(self.connection, job.id)
                except Exception:  # gone (expired or deleted) while Redis was away
                    log.warning("job %s: no longer in Redis; its outcome is dropped", job.id)
                    return
                if current.get_status() != JobStatus.STARTED or current.worker_name != self.name:
                    log.warning("job %s: re-queued while Redis was away; its new run ends it", job.id)
                    return

    def _give_back(self, job: Job, queue: Queue, execution: Execution) -> None:
        rq_adapter.give_back(self, job, queue, execution)
        log.warning("job %s: not finished within the stop's grace; back on the queue for the next worker", job.id)

    def request_stop(self, signum, frame) -> None:
        """SIGTERM/SIGINT: take no more jobs; those held finish within ``PRISM_STOP_GRACE_S``,
        then go back to the queue."""
        self.stopping = True
        self._stop_signalled_at = time.monotonic()
        self.runner.stop_at = self._stop_signalled_at + self.settings.stop_grace_s
        if self.get_state() == WorkerStatus.BUSY:
            log.warning(
                "stopping: the jobs in hand have %d s to finish, then go back to the queue (signal again to "
                "give them back now)",
                self.settings.stop_grace_s,
            )
        super().request_stop(signum, frame)

    def request_force_stop(self, signum, frame) -> None:
        """A second signal: the jobs in hand go back to the queue at their next step."""
        if time.monotonic() - self._stop_signalled_at < DUPLICATE_SIGNAL_S:
            return
        log.warning("second signal: giving the jobs in hand back to the queue now")
        self.runner.stop_at = 0.0

    def handle_exception(self, job: Job, *exc_info) -> None:
        """Record why the job ended. A cancellation is RQ's "stopped on request" (not a failure);
        expected failures are logged in one line, unexpected ones with the frames of their
        traceback. RQ's own handler is not used: it logs the job's arguments (the prompts) and
        the exception's message."""
        exc = exc_info[1]
        if isinstance(exc, JobCanceled):
            rq_adapter.mark_stopped(self, job.id)
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
        self._ended(job, {"status": "succeeded", "result": rq_adapter.result(job)})

    def handle_job_failure(self, job: Job, queue, started_job_registry=None, exc_string="", execution=None) -> None:
        canceled = rq_adapter.is_stopped(self, job.id)
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
        _signals_to_the_main_thread()
        while not self._alive.wait(self.heartbeat_s):
            try:
                self._mark_alive()
                self.outage.back()
                recover_lost_jobs(self.connection, self.settings)
            except RedisError:
                self.outage.lost()

    def _sweep(self) -> None:
        """Delete the blobs of jobs Redis no longer has, in a thread of its own (listing a large
        store must not delay the heartbeat); one worker of all sweeps per period."""
        _signals_to_the_main_thread()
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


def _signals_to_the_main_thread() -> None:
    """Block SIGINT and SIGTERM in the calling helper thread: the kernel then delivers them to the
    main thread, whose blocking dequeue they interrupt at once (delivered to a helper thread, they
    wait for that dequeue's minutes-long timeout)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def run_worker(settings: Settings, burst: bool = False) -> None:
    """Load the model once, then serve jobs until stopped: through any number of Redis outages
    (each a new RQ worker on the same model once Redis answers again)."""
    start = time.perf_counter()
    bundle = bundle_from_settings(settings)
    log.info(
        "model %s loaded on %s (%s) in %.1f s",
        bundle.identity,
        bundle.device,
        bundle.dtype,
        time.perf_counter() - start,
    )
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
    queue = job_queue(redis, settings)
    runner = JobRunner(bundle, settings, classifier_from_settings(settings))
    outage = Outage()
    while True:
        worker = None
        try:
            worker = PrismWorker(
                [queue],
                connection=redis,
                runner=runner,
                settings=settings,
                outage=outage,
                name=f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}",
                default_result_ttl=settings.job_ttl_s,
            )
            worker.work(burst=burst, with_scheduler=False)
        except RedisError:
            outage.lost()
        if burst or (worker is not None and worker.stopping):
            return
        outage.wait(redis)
