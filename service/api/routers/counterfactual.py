"""``POST /counterfactual``: validate, store the image, enqueue the job."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Header
from fastapi.responses import JSONResponse

from models.tokenizer import clip_tokenizer
from models.validation import validate_request
from service.api.deps import SettingsDep, Store, Tenant, rate_limit, require_utf8_form
from service.api.errors import retry_after
from service.api.forms import CounterfactualForm
from service.api.schemas import JobAccepted, MessageBody, ValidationErrorBody
from service.api.store import links
from service.api.uploads import read_upload

router = APIRouter()


@router.post(
    "/counterfactual",
    status_code=202,
    response_model=JobAccepted,
    summary="Submit an image for a counterfactual edit",
    dependencies=[Depends(require_utf8_form), Depends(rate_limit)],
    responses={
        401: {"model": MessageBody, "description": "missing or invalid X-API-Key"},
        409: {"model": MessageBody, "description": "Idempotency-Key reused with a different request"},
        413: {"model": ValidationErrorBody, "description": "request body or image too large"},
        415: {"model": ValidationErrorBody, "description": "not a PNG or JPEG"},
        422: {"model": ValidationErrorBody, "description": "a field is invalid; `loc` names it"},
        429: {"model": MessageBody, "description": "rate limit of this API key exceeded"},
        503: {"model": MessageBody, "description": "Redis unreachable or queue full; retry after Retry-After"},
    },
)
def submit(
    form: Annotated[CounterfactualForm, Form(media_type="multipart/form-data")],
    store: Store,
    tenant: Tenant,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None, Header(max_length=200, description="repeat a POST with the same key to get the same job back")
    ] = None,
) -> JSONResponse:
    image = read_upload(form.image.file, settings.max_upload_bytes, settings.max_image_pixels)
    request = form.job_request()
    validate_request(clip_tokenizer(), *request.resolved())
    job_id = store.submit(image, request, tenant, idempotency_key)
    body = JobAccepted(id=job_id, links=links(job_id)).model_dump(mode="json")
    headers = {"Location": f"/jobs/{job_id}", **retry_after(settings.retry_after_s)}
    return JSONResponse(body, status_code=202, headers=headers)
