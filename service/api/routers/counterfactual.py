"""``POST /counterfactual``: validate, store the image, enqueue the job."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Header, Request
from fastapi.responses import JSONResponse

from models.imaging.dicom import is_dicom
from models.request.errors import InvalidInput
from models.request.resolve import resolve
from service.api.deps import (
    Admitted,
    SettingsDep,
    Store,
    Tenant,
    one_part_per_field,
    require_multipart,
    require_utf8_form,
)
from service.api.docs import accepted, error_responses
from service.api.errors import retry_after
from service.api.forms import CounterfactualForm
from service.api.schemas import JobAccepted
from service.api.store import links
from service.api.uploads import NOT_DICOM, check_store_to, read_mask, read_reference, read_upload
from service.contract.tenants import signing_secret
from service.contract.webhooks import check_webhook_url

router = APIRouter(tags=["counterfactuals"])


@router.post(
    "/counterfactual",
    operation_id="submit_counterfactual",
    status_code=202,
    response_model=JobAccepted,
    summary="Submit an image for a counterfactual edit",
    dependencies=[Depends(require_multipart), Depends(require_utf8_form), Depends(one_part_per_field)],
    responses={
        202: accepted("job"),
        **error_responses(
            {
                401: "missing or invalid X-API-Key",
                404: "the source PACS has no such study, series or instance (`loc` names the UID field)",
                409: "Idempotency-Key reused with a different request",
                413: "request body or image too large",
                415: "not a multipart form, not a PNG, JPEG or DICOM image, or a DICOM object that is not an image",
                422: "a field is invalid; `loc` names it",
                429: "rate limit of this API key exceeded; retry after Retry-After",
                503: "Redis, the blob store or the source PACS unreachable, or the queue or storage full; retry after "
                "Retry-After",
            }
        ),
    },
)
def submit(
    http: Request,
    form: Annotated[CounterfactualForm, Form(media_type="multipart/form-data")],
    store: Store,
    tenant: Tenant,
    settings: SettingsDep,
    admission: Admitted,
    idempotency_key: Annotated[
        str | None, Header(max_length=200, description="repeat a POST with the same key to get the same job back")
    ] = None,
) -> JSONResponse:
    request = form.job_request()
    request.check_reference()
    if (form.image is None) == (request.source is None):
        message = "give an image, or a source and study_uid" if form.image is None else "give an image or a source"
        raise InvalidInput("image", message)
    if form.image is not None:
        image = read_upload(form.image.file, settings.max_upload_bytes, settings.max_image_pixels)
    else:
        image = read_reference(request, settings.pacs_file, settings.max_image_pixels)
    check_store_to(request.store_to, request.outputs, settings.pacs_file)
    if request.store_to is not None and not is_dicom(image.data):
        raise InvalidInput("store_to", NOT_DICOM)
    mask = None if form.mask is None else read_mask(form.mask.file, image.size, settings)
    edit = resolve(request, with_mask=mask is not None)
    if request.webhook is not None:
        check_webhook_url(request.webhook, settings.webhook_allow_private)
        if signing_secret(http.app.state.tenants, tenant, settings.webhook_secret) is None:
            raise InvalidInput("webhook", "no secret to sign webhooks with: use a key from `prism keys add`")
    admission.admit()
    job_id = store.submit(image.data, request, edit, tenant, idempotency_key, mask)
    body = JobAccepted(id=job_id, links=links(job_id)).model_dump(mode="json")
    headers = {"Location": f"/jobs/{job_id}", **retry_after(settings.retry_after_s)}
    return JSONResponse(body, status_code=202, headers=headers)
