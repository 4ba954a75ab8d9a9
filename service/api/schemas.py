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
    """What an autoscaler (KEDA's metrics-api trigger) reads: one GPU worker serves one job at a
    time, so the workers wanted are the jobs waiting plus the jobs running."""

    queued: int
    running: int
    workers_wanted: Annotated[int, Field(description="queued + running")]
