"""Pydantic models of the HTTP API's answers: what /docs and /openapi.json show."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from models.request.report import EditReport
from service.contract.jobs import JobError, Progress

JobState = Literal["queued", "running", "succeeded", "failed", "canceled"]


class JobLinks(BaseModel):
    self: str = Field(examples=["/jobs/3f2a9c0e6b1d4f7a8e5c2b9d0a1f3e4c"])
    files: dict[str, str] = Field(default_factory=dict, description="present once the job has succeeded")


class JobAccepted(BaseModel):
    id: str
    status: Literal["queued"] = "queued"
    links: JobLinks


class JobResult(EditReport):
    """The engine's report (also ``result.json``) and where to download the result files."""

    files: Annotated[dict[str, str], Field(description="download link of each result file")]


class Prompts(BaseModel):
    original_prompt: str
    edit_prompt: str


class JobStatus(BaseModel):
    id: str
    status: JobState
    prompts: Prompts | None = Field(
        None, description="the prompts of the edit (made from findings if those were given)"
    )
    progress: Progress
    requeues: int = Field(0, description="times the job went back to the queue because its worker died")
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: JobResult | None = None
    error: JobError | None = None
    links: JobLinks


class JobList(BaseModel):
    """A page of the caller's jobs, newest first."""

    jobs: list[JobStatus]
    total: Annotated[int, Field(description="jobs of this API key still kept")]
    next: Annotated[str | None, Field(description="link to the next page; null on the last")] = None


class ServiceInfo(BaseModel):
    """What a client needs to know before its first request."""

    auth: Annotated[bool, Field(description="requests need an X-API-Key")]
    max_upload_bytes: int
    max_image_pixels: int
    s_clip_threshold: Annotated[float, Field(description="PRISM keeps an edit whose S_CLIP is at least this")]
    conditions: Annotated[list[str], Field(description="the CheXpert conditions findings may name, in caption order")]
    version: str


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    redis: bool | None = None
    workers: int | None = None


class ScalingDemand(BaseModel):
    """What an autoscaler (KEDA's metrics-api trigger) reads: one GPU worker serves a pack of
    ``PRISM_WORKER_PACK`` jobs at a time, so the workers wanted are the jobs waiting plus the jobs
    running, over that."""

    queued: int
    running: int
    workers_wanted: Annotated[int, Field(description="(queued + running) / PRISM_WORKER_PACK, rounded up")]


ItemState = Literal["queued", "running", "succeeded", "failed", "canceled", "skipped"]


class BatchItemStatus(BaseModel):
    """One manifest row of a batch and where its job is."""

    line: Annotated[int, Field(description="its line in the manifest (the header is line 1)")]
    path: Annotated[str, Field(description="the image's name in the ZIP")]
    status: ItemState
    job_id: str | None = None
    reason: Annotated[str | None, Field(description="why it was skipped, or why its job failed")] = None
    error_code: Annotated[str | None, Field(description="a failed job's error code")] = None
    s_clip: float | None = None
    passed: Annotated[bool | None, Field(description="s_clip >= s_clip_threshold")] = None
    links: Annotated[dict[str, str], Field(description="the job's status and, once it succeeded, its files")] = Field(
        default_factory=dict
    )


class BatchLinks(BaseModel):
    self: str = Field(examples=["/batches/7c1e0f9a2b3d4e5f6a7b8c9d0e1f2a3b"])
    dataset: Annotated[str, Field(description="the dataset ZIP: the finished items' files and manifest.csv")]


class BatchSummary(BaseModel):
    id: str
    status: Annotated[Literal["running", "completed"], Field(description="completed once every job has ended")]
    created_at: datetime
    total: Annotated[int, Field(description="manifest rows")]
    ended: Annotated[int, Field(description="rows skipped, or whose job has succeeded, failed or been canceled")]
    links: BatchLinks


class BatchStatus(BatchSummary):
    """A batch: its counts per state, its progress, its errors by code and each item."""

    counts: Annotated[dict[ItemState, int], Field(description="items per state")]
    progress: Annotated[float, Field(description="fraction of the items that have ended, in [0, 1]")]
    errors: Annotated[dict[str, int], Field(description="failed items per error code")]
    passed: Annotated[int, Field(description="succeeded items whose S_CLIP reached the threshold")]
    items: list[BatchItemStatus]


class BatchList(BaseModel):
    """A page of the caller's batches, newest first."""

    batches: list[BatchSummary]
    total: int
    next: str | None = None
