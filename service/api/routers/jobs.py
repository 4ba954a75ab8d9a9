"""``/jobs``: the caller's jobs, a job's status, its cancellation and its result files.

A job is visible only to the API key that made it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response, StreamingResponse

from models.request.report import FILE_NAMES
from service.api.deps import Store, Tenant
from service.api.docs import error_responses
from service.api.errors import FileNotFound, JobNotFound
from service.api.schemas import JobList, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])

MEDIA_TYPES = {
    ".png": "image/png",
    ".npy": "application/octet-stream",
    ".json": "application/json",
    ".dcm": "application/dicom",
}
COMMON = {401: "missing or invalid X-API-Key", 503: "Redis or the blob store unreachable; retry after Retry-After"}
NOT_FOUND = "no such job (or it belongs to another API key)"


@router.get(
    "",
    operation_id="list_jobs",
    response_model=JobList,
    summary="The caller's jobs, newest first",
    responses=error_responses({**COMMON, 422: "a query parameter is invalid"}),
)
def list_jobs(
    store: Store,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=100, description="jobs per page")] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="jobs to skip")] = 0,
) -> JobList:
    jobs, total = store.list(tenant, limit, offset)
    more = offset + len(jobs) < total
    return JobList(jobs=jobs, total=total, next=f"/jobs?limit={limit}&offset={offset + limit}" if more else None)


@router.get(
    "/{job_id}",
    operation_id="get_job",
    response_model=JobStatus,
    summary="Status, progress, scores and result links of a job",
    responses=error_responses({**COMMON, 404: NOT_FOUND, 422: "malformed request"}),
)
def job_status(job_id: str, store: Store, tenant: Tenant) -> JobStatus:
    status = store.status(job_id, tenant)
    if status is None:
        raise JobNotFound
    return status


@router.post(
    "/{job_id}/cancel",
    operation_id="cancel_job",
    response_model=JobStatus,
    summary="Cancel a job: a queued job is removed, a running one stops within one denoising step",
    description=(
        "200 with `status` `canceled` when the job is canceled (a queued job at once; asking again is "
        "harmless and answers the same). 202 with `status` `running` when the job is running: it stops "
        "within one denoising step, then its status reads `canceled`. 409 once it has succeeded or failed."
    ),
    responses={
        202: {"model": JobStatus, "description": "running: the cancellation is requested"},
        **error_responses({**COMMON, 404: NOT_FOUND, 409: "the job has already finished", 422: "malformed request"}),
    },
)
def cancel(job_id: str, store: Store, tenant: Tenant, response: Response) -> JobStatus:
    status = store.cancel(job_id, tenant)
    if status is None:
        raise JobNotFound
    if status.status != "canceled":
        response.status_code = 202
    return status


@router.get(
    "/{job_id}/files/{name}",
    operation_id="get_job_file",
    summary="Download a result file",
    response_class=Response,
    responses={
        200: {
            "description": "the file; its media type follows its name",
            "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in MEDIA_TYPES.values()},
        },
        **error_responses(
            {
                **COMMON,
                404: "no such job or file, or the job has not succeeded",
                410: "the job succeeded but its files are no longer stored (expired or removed)",
                422: "malformed request",
            }
        ),
    },
)
def job_file(
    job_id: str,
    name: Annotated[str, Path(description="a result file", json_schema_extra={"enum": list(FILE_NAMES)})],
    store: Store,
    tenant: Tenant,
) -> Response:
    found = store.file(job_id, name, tenant)
    if found is None:
        status = store.status(job_id, tenant)
        if status is None:
            raise JobNotFound
        if not status.links.files:
            raise FileNotFound(f"the job has no files: it is {status.status}")
        raise FileNotFound(f"no file {name!r} for this job; its files: {', '.join(status.links.files)}")
    size, chunks = found
    headers = {"Content-Disposition": f'attachment; filename="{name}"', "Content-Length": str(size)}
    return StreamingResponse(chunks, media_type=MEDIA_TYPES[name[name.rindex(".") :]], headers=headers)
