"""``/jobs/{id}``: status, cancel, result files. A job is visible only to the key that made it."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.api.deps import Store, Tenant
from service.api.errors import FileNotFound, JobNotFound, NotCancelable
from service.api.schemas import JobStatus, MessageBody
from service.contract.jobs import FILE_NAMES

router = APIRouter(prefix="/jobs")

CONTENT_TYPES = {
    ".png": "image/png",
    ".npy": "application/octet-stream",
    ".json": "application/json",
    ".dcm": "application/dicom",
}
UNAUTHORIZED = {401: {"model": MessageBody, "description": "missing or invalid X-API-Key"}}
UNAVAILABLE = {503: {"model": MessageBody, "description": "Redis unreachable; retry after Retry-After"}}
NOT_FOUND = {404: {"model": MessageBody, "description": "no such job (or it belongs to another API key)"}}


@router.get(
    "/{job_id}",
    response_model=JobStatus,
    summary="Status, progress, scores and result links of a job",
    responses={**UNAUTHORIZED, **NOT_FOUND, **UNAVAILABLE},
)
def job_status(job_id: str, store: Store, tenant: Tenant) -> JobStatus:
    status = store.status(job_id, tenant)
    if status is None:
        raise JobNotFound
    return status


@router.post(
    "/{job_id}/cancel",
    response_model=JobStatus,
    summary="Cancel a job: a queued job is removed, a running one stops within one denoising step",
    responses={
        **UNAUTHORIZED,
        **NOT_FOUND,
        409: {"model": MessageBody, "description": NotCancelable.detail},
        **UNAVAILABLE,
    },
)
def cancel(job_id: str, store: Store, tenant: Tenant) -> JobStatus:
    status = store.cancel(job_id, tenant)
    if status is None:
        raise JobNotFound
    return status


@router.get(
    "/{job_id}/files/{name}",
    summary="Download a result file",
    response_class=Response,
    responses={
        200: {
            "description": "the file",
            "content": {media_type: {} for media_type in CONTENT_TYPES.values()},
        },
        **UNAUTHORIZED,
        404: {"model": MessageBody, "description": "no such job or file, or not finished"},
        **UNAVAILABLE,
    },
)
def job_file(job_id: str, name: str, store: Store, tenant: Tenant) -> Response:
    content = store.file(job_id, name, tenant)
    if content is None:
        raise FileNotFound(f"no file {name!r} for this job; files: {', '.join(FILE_NAMES)}")
    media_type = CONTENT_TYPES[name[name.rindex(".") :]]
    return Response(content, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{name}"'})
