"""Adapts the engine to jobs: input from the blob store, progress into job meta, outputs into the
blob store.

A job that cannot finish ends with an exception: :class:`JobFailed` with its :class:`JobError`,
or the engine's own, which :func:`failure_of` turns into one. The worker records it (see
``main``). Jobs run one at a time or as a pack (``PRISM_WORKER_PACK``), where each still ends
on its own: canceled, failed or succeeded.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError
from redis.exceptions import RedisError
from rq.job import Job
from rq.timeouts import JobTimeoutException

from models.diffusion.components import ModelBundle
from models.diffusion.inversion import InversionCache
from models.diffusion.packing import LeavePack
from models.imaging.files import decode_image, keep_mask
from models.pipeline import ITEM_ERRORS, Counterfactual, PackItem, encode_report, generate_counterfactuals
from models.request.errors import ImageError, InvalidInput
from models.request.params import DICOM_FILES
from models.request.report import StoredCopy
from models.scoring.classifier import FindingClassifier
from service.contract import metrics
from service.contract.blobs import BlobMissing, BlobStore, StorageUnavailable, file_blob
from service.contract.jobs import ErrorCode, JobError, Progress, cancel_flags, job_args, save_progress
from service.contract.keys import cancel_key
from service.contract.pacs import PacsUnavailable, endpoint
from service.contract.settings import Settings
from service.contract.webhooks import notify_job

log = logging.getLogger("prism.worker")
PROGRESS_EVERY_S = 0.5


class JobCanceled(LeavePack):
    """Raised from the progress callback when the client canceled the job: it leaves its pack."""


class StopTaking(Exception):
    """Raised from the progress callback once a stopping worker's grace is over: every job in the
    pass goes back to the queue."""


class JobFailed(Exception):
    def __init__(self, error: JobError) -> None:
        super().__init__(error.code)
        self.error = error


def failure_of(exc: BaseException, job_id: str) -> JobError:
    """The client-facing reason for an exception; messages never repeat prompts or pixels."""
    if isinstance(exc, JobFailed):
        return exc.error
    if isinstance(exc, JobTimeoutException):
        return JobError(code=ErrorCode.timeout, message="the job exceeded its time limit")
    if isinstance(exc, ImageError):
        return JobError(code=ErrorCode.invalid_image, message=str(exc))
    if isinstance(exc, InvalidInput):
        return JobError(code=ErrorCode.invalid_parameters, message=f"{exc.field}: check the request")
    if isinstance(exc, ValidationError):
        fields = ", ".join(sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]}))
        return JobError(code=ErrorCode.invalid_parameters, message=f"invalid job request: {fields}")
    return JobError(code=ErrorCode.internal, message=f"the worker failed on this job; its log has job id {job_id}")


ITEM_FAILURES = (JobFailed, ValidationError, *ITEM_ERRORS)
"""What fails one job of a pack, not the pack."""


Outcome = dict | BaseException
"""How a job ended: the engine's report as JSON, or why it did not finish."""
Ended = Callable[[Job, Outcome], None]


class JobRunner:
    """Holds the model bundle for the worker's lifetime and runs jobs, one or a pack at a time."""

    def __init__(
        self,
        bundle: ModelBundle,
        settings: Settings,
        classifier: FindingClassifier | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        self.bundle = bundle
        self.settings = settings
        self.classifier = classifier
        self.blobs = blobs or BlobStore.from_settings(settings)
        self.stop_at: float | None = None
        """When a stopping worker's grace ends (``time.monotonic()``); None while it is not stopping."""
        self.cache = None
        if settings.inversion_cache_dir:
            directory = Path(settings.inversion_cache_dir).expanduser()
            self.cache = InversionCache(directory, settings.inversion_cache_max_bytes)

    def run_pack(self, jobs: Sequence[Job], ended: Ended) -> None:
        """Run jobs that share a :func:`~models.pipeline.pack_key` as one pack, calling ``ended``
        once per job with its outcome: at once for a job that cannot start (its input expired or
        undecodable) or is canceled mid-run, which leaves the pack while the others go on; at
        the end for the others, after their outputs are stored. What stops the whole pack (a
        timeout, an engine fault) is raised, and no ``ended`` is called for the jobs it stopped."""
        started: list[Job] = []
        items: list[PackItem] = []
        for job in jobs:
            try:
                items.append(self._prepare(job, ended))
            except ITEM_FAILURES as exc:
                if not isinstance(exc, JobCanceled):  # a canceled job ended as it left
                    ended(job, exc)
                continue
            started.append(job)
        if not items:
            return
        results = generate_counterfactuals(self.bundle, items, cache=self.cache, classifier=self.classifier)
        for job, result in zip(started, results, strict=True):
            if isinstance(result, JobCanceled):
                continue  # ended when it left
            if isinstance(result, Exception):
                ended(job, result)
                continue
            try:
                outcome: Outcome = self._store(job, result)
            except ITEM_FAILURES as exc:  # its outputs were not stored: this job fails, not the pack
                outcome = exc
            ended(job, outcome)

    def _prepare(self, job: Job, ended: Ended) -> PackItem:
        """The job's input from the blob store, decoded, and its progress callback; the ``started`` webhook."""
        redis = job.connection

        def leave_canceled() -> None:
            self.drop_inputs(job)
            with contextlib.suppress(RedisError):
                redis.delete(cancel_key(job.id))
            canceled = JobCanceled()
            ended(job, canceled)
            raise canceled

        if self._canceled(job):  # canceled (or its batch being canceled) as it was taken: it does not start
            leave_canceled()
        args = job_args(job)
        try:
            data = self.blobs.get(args.image)
            mask = self.blobs.get(args.mask) if args.mask else None
        except BlobMissing:
            if self._canceled(job):  # the cancel deleted the input just now
                leave_canceled()
            message = "the uploaded image is no longer stored; submit the job again"
            raise JobFailed(JobError(code=ErrorCode.input_expired, message=message)) from None
        except StorageUnavailable as exc:
            raise JobFailed(JobError(code=ErrorCode.storage_unavailable, message=str(exc))) from None
        image = decode_image(data, self.settings.max_image_pixels)
        keep = None
        if mask is not None:
            keep = keep_mask(decode_image(mask, self.settings.max_image_pixels, accept_colour=True))
        last_save = 0.0

        def progress(phase: str, step: int, total: int) -> None:
            nonlocal last_save
            if self.stop_at is not None and time.monotonic() >= self.stop_at:
                raise StopTaking
            if self._canceled(job):
                leave_canceled()
            now = time.monotonic()
            if step in (0, 1, total) or now - last_save > PROGRESS_EVERY_S:
                with contextlib.suppress(RedisError):  # Redis away: the job goes on, its progress waits
                    save_progress(job, Progress(phase=phase, step=step, total=total))
                    last_save = now

        log.info("job %s: started", job.id)
        try:
            if job.enqueued_at is not None:
                wait_s = (datetime.now(UTC) - job.enqueued_at.replace(tzinfo=UTC)).total_seconds()
                metrics.observe(redis, "queue_wait_seconds", wait_s)
            notify_job(redis, self.settings, job, "started", {"status": "running"})
        except RedisError:
            log.warning(
                "job %s: started while Redis was away; its started event and wait time are not recorded", job.id
            )
        progress("decode", 0, 1)
        return PackItem(image, args.edit, progress, keep)

    def _store(self, job: Job, result: Counterfactual) -> dict:
        """The outputs into the PACS the request names (``store_to``), then into the blob store;
        the report as JSON. A PACS or a store that refuses the outputs fails the job with its own
        code. The inputs stay until the job's end is recorded (:meth:`drop_inputs`): a job
        re-queued meanwhile runs again from them. Every DICOM UID derives from the job's id."""
        files = result.files(uid_seed=job.id)
        report = result.report
        if (store_to := job_args(job).request.store_to) is not None:
            dicom = {name: files[name] for name in DICOM_FILES if name in files}
            report = report.model_copy(update={"stored": self._to_pacs(job, store_to, dicom)})
            if "result.json" in files:
                files["result.json"] = encode_report(report)
        try:
            for name, content in files.items():
                self.blobs.put(file_blob(job.id, name), content)
        except StorageUnavailable as exc:
            message = f"{exc}: the result files were not stored; submit the job again"
            raise JobFailed(JobError(code=ErrorCode.storage_unavailable, message=message)) from None
        for phase, seconds in report.timings.items():
            metrics.observe(job.connection, "phase_seconds", seconds, phase)
        log.info("job %s: done in %.1f s", job.id, sum(report.timings.values()))
        return report.model_dump(mode="json")

    def _to_pacs(self, job: Job, name: str, files: dict[str, bytes]) -> StoredCopy:
        """``files`` stored into endpoint ``name``, tried again after 2, 4, 8 ... s
        (``pacs_retry_first_s``, ``pacs_retries`` times) without computing anything again; a PACS
        that refuses them every time fails the job with ``store_failed``. Logs name the endpoint only."""
        pacs = endpoint(self.settings.pacs_file, name, "store_to")
        tries, wait_s = 1, self.settings.pacs_retry_first_s
        while True:
            try:
                stored = pacs.store(files)
            except (PacsUnavailable, OSError, ValueError, RuntimeError) as exc:
                reason = str(exc) if isinstance(exc, PacsUnavailable) else f"storing failed ({type(exc).__name__})"
                if tries > self.settings.pacs_retries:
                    message = f"{reason}: the outputs were not stored after {tries} tries"
                    raise JobFailed(JobError(code=ErrorCode.store_failed, message=message)) from None
                log.warning("job %s: %s; trying again in %.0f s", job.id, reason, wait_s)
                time.sleep(wait_s)
                tries, wait_s = tries + 1, wait_s * 2
                continue
            log.info("job %s: %d outputs stored to %s by %s", job.id, len(files), name, stored.protocol)
            return stored

    def _canceled(self, job: Job) -> bool:
        """The client canceled the job, or its batch is being canceled; False while Redis is away."""
        try:
            return bool(job.connection.exists(*cancel_flags(job)))
        except RedisError:
            return False

    def drop_inputs(self, job: Job) -> None:
        """The job's input (and mask) blobs, no longer needed; the sweep takes any left behind."""
        try:
            args = job_args(job)
            self.blobs.delete(key for key in (args.image, args.mask) if key)
        except StorageUnavailable:
            log.warning("job %s: could not delete its inputs; the sweep will", job.id)
