"""What a counterfactual job carries, how it is enqueued, and how it ends.

A job's arguments are JSON (never pickle) and name the blob of the uploaded image
(:mod:`service.contract.blobs`) rather than carrying its bytes. A job ends one of three ways, each read back one way:

* succeeded: the job's return value is the engine's :class:`~models.request.report.EditReport`;
* failed: ``meta["error"]`` holds a :class:`JobError`, written by the worker or by the recovery sweep;
* canceled: RQ's own canceled (still queued) or stopped (was running) state.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from models.request.errors import InvalidInput
from models.request.params import CommaList
from models.request.reference import Uid
from models.request.resolve import EditRequest, ResolvedEdit
from service.contract.blobs import input_blob, mask_blob
from service.contract.keys import batch_cancel_key, cancel_key
from service.contract.settings import Settings

EventName = Literal["started", "completed"]
TASK = "worker.tasks.run_counterfactual"
"""The job function, by name: the API never imports the worker."""


class JobRequest(EditRequest):
    """What a client submits besides the image: the edit request and where its events go."""

    webhook: Annotated[
        str | None,
        Field(
            max_length=2000,
            description="http(s) URL that receives the job's events, signed the Standard Webhooks way",
            examples=["https://pacs-bridge.example.org/prism-events"],
        ),
    ] = None
    webhook_events: Annotated[
        tuple[EventName, ...],
        Field(min_length=1, description="which events the webhook receives"),
        CommaList,
    ] = ("started", "completed")
    source: Annotated[
        str | None,
        Field(
            max_length=100,
            description="instead of an image: a PACS endpoint of the service's (PRISM_PACS_FILE) to take the "
            "study from, with study_uid (and series_uid or sop_uid)",
            examples=["radiology"],
        ),
    ] = None
    study_uid: Annotated[Uid | None, Field(description="with source: the study; its frontal radiograph is used")] = None
    series_uid: Annotated[Uid | None, Field(description="with source: the series to take the radiograph from")] = None
    sop_uid: Annotated[Uid | None, Field(description="with source: the instance itself")] = None
    store_to: Annotated[
        str | None,
        Field(
            max_length=100,
            description="a PACS endpoint of the service's to store counterfactual.dcm, difference.dcm and report.dcm "
            "into the input's study once the job succeeds (a DICOM input only); result.json's stored says where",
            examples=["radiology"],
        ),
    ] = None

    def check_reference(self) -> None:
        """A study reference is an endpoint and a study, a series or instance only within one: else
        an :class:`InvalidInput` naming the field."""
        if (self.source is None) != (self.study_uid is None):
            raise InvalidInput("study_uid" if self.source else "source", "source and study_uid go together")
        if self.source is None and (self.series_uid or self.sop_uid):
            raise InvalidInput("series_uid" if self.series_uid else "sop_uid", "needs source and study_uid")


class JobArgs(BaseModel):
    """A job's arguments, one typed envelope: the blobs of its input (and anatomy mask), the
    client's ``request`` (where its events go) and the ``edit`` it was resolved to at the door.
    Stored as JSON (never pickle) in the job; read in one place, :func:`job_args`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str
    request: JobRequest
    edit: ResolvedEdit
    mask: str | None = None


class ErrorCode(StrEnum):
    """Why a job failed; a client can act on each."""

    invalid_image = "invalid_image"
    invalid_parameters = "invalid_parameters"
    input_expired = "input_expired"
    storage_unavailable = "storage_unavailable"
    store_failed = "store_failed"
    timeout = "timeout"
    worker_lost = "worker_lost"
    internal = "internal"


class JobError(BaseModel):
    """A failed job's reason. The message never repeats prompts, pixels or file names."""

    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    message: str


class Progress(BaseModel):
    """Where a running job is: written by the worker into the job's meta, read by the API."""

    phase: Annotated[
        str | None, Field(examples=["null_text"], description="decode, encode, inversion, null_text, editing, scoring")
    ] = None
    step: int = 0
    total: int = 0


def job_queue(redis: Redis, settings: Settings) -> Queue:
    """The queue both sides use, with JSON job arguments (pickled arguments would let anyone who
    can write to Redis run code in a worker)."""
    return Queue(settings.queue_name, connection=redis, serializer=JSONSerializer)


def fetch_job(redis: Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=redis, serializer=JSONSerializer)


def enqueue(
    queue: Queue,
    job_id: str,
    request: JobRequest,
    edit: ResolvedEdit,
    owner: str,
    settings: Settings,
    with_mask: bool = False,
    batch: str | None = None,
) -> Job:
    """Enqueue the job for an image already stored at ``input_blob(job_id)`` (and its anatomy mask
    at ``mask_blob(job_id)`` if ``with_mask``). The job carries the client's ``request`` (its
    webhook settings), the ``edit`` it was resolved to, which the worker runs and a status shows,
    and the ``batch`` it belongs to, if any."""
    ttl = settings.job_ttl_s
    args = JobArgs(image=input_blob(job_id), request=request, edit=edit, mask=mask_blob(job_id) if with_mask else None)
    return queue.enqueue_call(
        TASK,
        kwargs=args.model_dump(mode="json"),
        job_id=job_id,
        timeout=settings.job_timeout_s,
        result_ttl=ttl,
        failure_ttl=ttl,
        ttl=ttl,
        description="prism counterfactual",
        meta={"owner": owner, **({"batch": batch} if batch else {})},
    )


def fetch_many(redis: Redis, job_ids: list[str]) -> list[Job | None]:
    """The jobs in one round trip; None for each that no longer exists."""
    return Job.fetch_many(job_ids, connection=redis, serializer=JSONSerializer)


def job_args(job: Job) -> JobArgs:
    """The job's arguments, read back as :func:`enqueue` wrote them."""
    return JobArgs.model_validate(job.kwargs)


def job_edit(job: Job) -> ResolvedEdit:
    """The edit a job was resolved to at submission."""
    return job_args(job).edit


def cancel_flags(job: Job) -> list[str]:
    """The keys that, set, mean the job must not run on: its own cancel, its batch's."""
    batch = job.meta.get("batch")
    return [cancel_key(job.id), *([batch_cancel_key(batch)] if batch else [])]


def record_failure(job: Job, error: JobError) -> None:
    job.meta["error"] = error.model_dump(mode="json")
    job.save_meta()


def read_failure(job: Job) -> JobError:
    """The recorded reason of a failed job (``internal`` if none was recorded)."""
    raw = job.get_meta(refresh=False).get("error")
    if raw is None:
        return JobError(code=ErrorCode.internal, message=f"the worker failed on this job; its log has job id {job.id}")
    return JobError.model_validate(raw)


def save_progress(job: Job, progress: Progress) -> None:
    job.meta["progress"] = progress.model_dump()
    job.save_meta()


def read_progress(job: Job) -> Progress:
    return Progress.model_validate(job.get_meta(refresh=False).get("progress") or {})
