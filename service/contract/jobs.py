"""What a counterfactual job carries, how it is enqueued, and how it ends.

A job's arguments are JSON (never pickle) and name the Redis key of the uploaded image rather
than carrying its bytes. A job ends one of three ways, each read back one way:

* succeeded: the job's return value is the engine's :class:`~models.request.report.EditReport`;
* failed: ``meta["error"]`` holds a :class:`JobError`, written by the worker or by the recovery sweep;
* canceled: RQ's own canceled (still queued) or stopped (was running) state.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from models.request.errors import InvalidInput
from models.request.findings import Condition, findings_prompts, parse_labels
from models.request.params import CommaList, EditOptions, EditParams
from service.contract.keys import input_key, mask_key
from service.contract.settings import Settings

EventName = Literal["started", "completed"]
TASK = "worker.tasks.run_counterfactual"
"""The job function, by name: the API never imports the worker."""

FileName = Literal[
    "counterfactual.png",
    "difference.png",
    "difference.npy",
    "reconstruction.png",
    "result.json",
    "counterfactual.dcm",
    "difference.dcm",
]
FILE_NAMES: tuple[str, ...] = get_args(FileName)
DICOM_FILES = ("counterfactual.dcm", "difference.dcm")
"""Written only for a DICOM input."""

PROMPT_MAX_CHARS = 1000


def _labels(field: str):
    return BeforeValidator(lambda value: None if value in (None, "") else parse_labels(value, field))


LabelRow = dict[Condition, Literal[1, 0, -1] | None]


class JobRequest(EditOptions):
    """Everything a worker needs besides the image: what the image shows and what the
    counterfactual should show, as prompts or as CheXpert findings, and the client's edit options."""

    original_prompt: Annotated[
        str | None,
        Field(
            max_length=PROMPT_MAX_CHARS,
            description="what the image shows (or give findings and edit)",
            examples=["chest x-ray of a patient with support devices"],
        ),
    ] = None
    edit_prompt: Annotated[
        str | None,
        Field(
            max_length=PROMPT_MAX_CHARS,
            description="what the counterfactual should show",
            examples=["chest x-ray of a patient without support devices"],
        ),
    ] = None
    findings: Annotated[
        LabelRow | None,
        _labels("findings"),
        Field(description="instead of prompts: the image's CheXpert labels (1, 0, -1 or blank per condition)"),
    ] = None
    edit: Annotated[
        LabelRow | None,
        _labels("edit"),
        Field(description="with findings: the labels to change, e.g. {'Support Devices': 0}"),
    ] = None

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

    def resolved(self) -> tuple[str, str, EditParams]:
        """The original and edit prompts and the engine's parameters. Findings become prompts by
        PRISM's caption template; LocalBlend follows, and the guided method's classifier targets,
        the conditions the edit changes, unless given. Raises :class:`~models.request.errors.InvalidInput`
        naming the field."""
        original, edited, params = self._prompts()
        if params.method == "guided" and not params.classifier_targets:
            message = "the guided method needs the findings to remove (0) or add (1), or findings and edit"
            raise InvalidInput("classifier_targets", message)
        return original, edited, params

    def _prompts(self) -> tuple[str, str, EditParams]:
        params = EditParams(**self.model_dump(include=set(EditOptions.model_fields)))
        if self.findings is None and self.edit is None:
            return self.original_prompt or "", self.edit_prompt or "", params
        if self.original_prompt or self.edit_prompt:
            raise InvalidInput("findings", "give findings and edit, or original_prompt and edit_prompt, not both")
        if self.findings is None or self.edit is None:
            raise InvalidInput("findings" if self.findings is None else "edit", "findings and edit go together")
        original, edited, changed = findings_prompts(self.findings, self.edit)
        after = {**self.findings, **self.edit}
        defaults = {
            "blend_words": changed if params.blend_words is None else params.blend_words,
            "classifier_targets": params.classifier_targets or {c: int(after.get(c) == 1) for c in changed},
        }
        return original, edited, params.replace(**defaults)


class ErrorCode(StrEnum):
    """Why a job failed; a client can act on each."""

    invalid_image = "invalid_image"
    invalid_parameters = "invalid_parameters"
    input_expired = "input_expired"
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
    queue: Queue, job_id: str, request: JobRequest, owner: str, settings: Settings, with_mask: bool = False
) -> Job:
    """Enqueue the job for an image already stored at ``input_key(job_id)`` (and its anatomy mask at
    ``mask_key(job_id)`` if ``with_mask``)."""
    ttl = settings.job_ttl_s
    kwargs = {"input_key": input_key(job_id), "request": request.model_dump(mode="json")}
    return queue.enqueue_call(
        TASK,
        kwargs={**kwargs, "mask_key": mask_key(job_id) if with_mask else None},
        job_id=job_id,
        timeout=settings.job_timeout_s,
        result_ttl=ttl,
        failure_ttl=ttl,
        ttl=ttl,
        description="prism counterfactual",
        meta={"owner": owner},
    )


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
