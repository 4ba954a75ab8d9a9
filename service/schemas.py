"""Pydantic models of the HTTP API: what /docs and /openapi.json show."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

JobState = Literal["queued", "running", "succeeded", "failed", "canceled"]
FILE_NAMES = ("counterfactual.png", "difference.png", "difference.npy", "reconstruction.png", "result.json")


class JobLinks(BaseModel):
    self: str = Field(examples=["/jobs/3f2a9c0e6b1d4f7a8e5c2b9d0a1f3e4c"])
    files: dict[str, str] = Field(default_factory=dict, description="present once the job has succeeded")


class JobAccepted(BaseModel):
    id: str
    status: Literal["queued"] = "queued"
    links: JobLinks


class Progress(BaseModel):
    phase: str | None = Field(
        None, examples=["null_text"], description="encode, inversion, null_text, editing, scoring"
    )
    step: int = 0
    total: int = 0


class Similarities(BaseModel):
    s_clip: float
    image_similarity: float
    text_image_before: float
    text_image_after: float
    edit_text_image_before: float


class JobResult(BaseModel):
    s_clip: float = Field(description="CLIP directional score of the chosen candidate, in [-1, 1]")
    passed: bool = Field(description="s_clip >= s_clip_threshold (PRISM keeps edits with S_CLIP >= 0.1)")
    s_clip_threshold: float
    similarities: Similarities
    score_reference: str = Field(description="which image the scores compare against (the reconstruction)")
    chosen_self_replace: float
    candidates: list[dict]
    timings: dict[str, float] = Field(description="seconds per phase")
    files: dict[str, str]


class JobError(BaseModel):
    code: str = Field(examples=["invalid_image", "input_expired", "worker_lost", "timeout", "internal_error"])
    message: str


class JobStatus(BaseModel):
    id: str
    status: JobState
    progress: Progress
    requeues: int = Field(0, description="times the job went back to the queue because its worker died")
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: JobResult | None = None
    error: JobError | None = None
    links: JobLinks


class ErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    detail: list[ErrorDetail]


class MessageBody(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    redis: bool | None = None
    workers: int | None = None
