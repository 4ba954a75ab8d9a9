"""``/batches``: a ZIP of images and a manifest in, one job per row, a dataset ZIP out.

A batch is visible only to the API key that made it; its jobs are that key's jobs too.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from models.request.errors import InvalidInput
from models.request.manifest import Manifest, ManifestInvalid, read_manifest
from service.api.archive import Archive, ArchiveLimits, open_archive
from service.api.batches import BatchStore, check_rows, content_digest
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
from service.api.errors import BatchNotFound, BatchTooLarge, retry_after
from service.api.forms import BatchForm
from service.api.schemas import BatchList, BatchStatus, BatchSummary
from service.api.uploads import check_store_to
from service.contract.pacs import Pacs, endpoint
from service.contract.settings import Settings
from service.contract.tenants import signing_secret
from service.contract.webhooks import check_webhook_url

router = APIRouter(prefix="/batches", tags=["batches"])
COMMON = {401: "missing or invalid X-API-Key", 503: "Redis unreachable; retry after Retry-After"}
NOT_FOUND = "no such batch (expired, or it belongs to another API key)"


def get_batches(store: Store) -> BatchStore:
    return BatchStore(store)


Batches = Annotated[BatchStore, Depends(get_batches)]


@router.post(
    "",
    operation_id="submit_batch",
    status_code=202,
    response_model=BatchSummary,
    summary="Submit a ZIP of images and a manifest: one counterfactual job per row",
    description=(
        "The whole manifest is checked before anything is enqueued: every bad cell and every missing or "
        "unreadable image is listed in one 422, by line (`loc`: body, manifest, line, column). A findings "
        "row the edit does not change is skipped with its reason. The batch must fit in the queue whole "
        "(503 and Retry-After otherwise); it counts as one submission against the rate limit. "
        "`webhook` receives `batch.completed` once every item has ended; items send no webhooks of their own."
    ),
    dependencies=[Depends(require_multipart), Depends(require_utf8_form), Depends(one_part_per_field)],
    responses={
        202: accepted("batch"),
        **error_responses(
            {
                401: "missing or invalid X-API-Key",
                409: "Idempotency-Key reused with a different request",
                413: "body, archive, an entry or the number of rows over its limit (ZIP bombs)",
                415: "not a multipart form",
                422: "a field, the archive (entry names such as ../x.png) or manifest rows are invalid",
                429: "rate limit of this API key exceeded; retry after Retry-After",
                503: "Redis or the source PACS unreachable, or the queue has no room for the batch; retry after "
                "Retry-After",
            }
        ),
    },
)
def submit_batch(
    http: Request,
    form: Annotated[BatchForm, Form(media_type="multipart/form-data")],
    batches: Batches,
    tenant: Tenant,
    settings: SettingsDep,
    admission: Admitted,
    idempotency_key: Annotated[
        str | None, Header(max_length=200, description="repeat a POST with the same key to get the same batch back")
    ] = None,
) -> JSONResponse:
    base = form.base_request()
    manifest_bytes = form.manifest.file.read(settings.max_upload_bytes + 1)
    if len(manifest_bytes) > settings.max_upload_bytes:
        raise InvalidInput("manifest", f"exceeds {settings.max_upload_bytes} bytes")
    try:
        manifest = read_manifest(manifest_bytes, base)
    except ManifestInvalid as exc:
        raise InvalidInput("manifest", str(exc)) from exc
    rows = len(manifest.items) + len(manifest.errors)
    if rows > settings.batch_max_items:
        raise BatchTooLarge(f"the manifest has {rows} rows; the limit is {settings.batch_max_items}")
    archive, pacs = _image_source(form, manifest, settings)
    check_store_to(form.store_to, base.outputs, settings.pacs_file)
    images = check_rows(manifest, archive, pacs, settings.max_image_pixels, form.store_to is not None)
    try:
        if form.webhook is not None:
            check_webhook_url(form.webhook, settings.webhook_allow_private)
            if signing_secret(http.app.state.tenants, tenant, settings.webhook_secret) is None:
                raise InvalidInput("webhook", "no secret to sign webhooks with: use a key from `prism keys add`")
        admission.admit()
        digest = content_digest(
            form.images.file if form.images is not None else b"",
            manifest_bytes,
            form.model_dump_json(exclude={"images", "manifest"}).encode(),
        )
        targets = {"source": form.source, "store_to": form.store_to}
        record = batches.submit(images, manifest.items, targets, tenant, form.webhook, idempotency_key, digest)
    finally:
        images.spool.close()
    body = batches.summary(record).model_dump(mode="json")
    headers = {"Location": f"/batches/{record.id}", **retry_after(settings.retry_after_s)}
    return JSONResponse(body, status_code=202, headers=headers)


def _image_source(form: BatchForm, manifest: Manifest, settings: Settings) -> tuple[Archive | None, Pacs | None]:
    """The ZIP the manifest's paths name, or the PACS its studies are in (``source``): one of them."""
    if manifest.by_reference:
        if form.images is not None:
            raise InvalidInput("images", "the manifest names studies (study_uid): leave the ZIP out")
        if form.source is None:
            raise InvalidInput("source", "the manifest names studies: give source, the PACS endpoint they are in")
        return None, endpoint(settings.pacs_file, form.source, "source")
    if form.source is not None:
        raise InvalidInput("source", "is for a manifest of studies (study_uid); this one names files (Path)")
    if form.images is None:
        raise InvalidInput("images", "give a ZIP of the images the manifest's Path column names")
    limits = ArchiveLimits(
        max_entries=settings.batch_max_items * 4,
        max_entry_bytes=settings.max_upload_bytes,
        max_total_bytes=settings.batch_max_uncompressed_bytes,
    )
    return open_archive(form.images.file, limits), None


@router.get(
    "",
    operation_id="list_batches",
    response_model=BatchList,
    summary="The caller's batches, newest first",
    responses=error_responses({**COMMON, 422: "a query parameter is invalid"}),
)
def list_batches(
    batches: Batches,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=100, description="batches per page")] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="batches to skip")] = 0,
) -> BatchList:
    page, total = batches.list(tenant, limit, offset)
    more = offset + len(page) < total
    return BatchList(
        batches=page, total=total, next=f"/batches?limit={limit}&offset={offset + limit}" if more else None
    )


@router.get(
    "/{batch_id}",
    operation_id="get_batch",
    response_model=BatchStatus,
    summary="Counts per state, progress, errors by code, and each item with its links",
    responses=error_responses({**COMMON, 404: NOT_FOUND, 422: "malformed request"}),
)
def batch_status(batch_id: str, batches: Batches, tenant: Tenant) -> BatchStatus:
    record = batches.record(batch_id, tenant)
    if record is None:
        raise BatchNotFound
    return batches.status(record)


@router.post(
    "/{batch_id}/cancel",
    operation_id="cancel_batch",
    response_model=BatchStatus,
    summary="Cancel the items not yet ended: queued ones are removed, running ones stop within a step",
    description="200 once no item is queued or running; 202 while running items are still stopping.",
    responses={
        202: {"model": BatchStatus, "description": "running items are stopping"},
        **error_responses({**COMMON, 404: NOT_FOUND, 422: "malformed request"}),
    },
)
def cancel_batch(batch_id: str, batches: Batches, tenant: Tenant, response: Response) -> BatchStatus:
    record = batches.record(batch_id, tenant)
    if record is None:
        raise BatchNotFound
    status = batches.cancel(record)
    if status.status != "completed":
        response.status_code = 202
    return status


@router.get(
    "/{batch_id}/dataset.zip",
    operation_id="get_batch_dataset",
    summary="The dataset: the finished items' counterfactuals, difference maps and results, and manifest.csv",
    description=(
        "Streamed as it is read from Redis. Files are named after each input's path: "
        "`counterfactuals/<path>.png` (and `.dcm` for DICOM inputs), `differences/<path>.png`, `.npy` (and `.dcm`), "
        "`results/<path>.json`. `manifest.csv` has one line per manifest row: its status, prompts, S_CLIP, "
        "passed, chosen candidate, error, and the counterfactual's name in the ZIP when it is there. "
        "Items still queued or running are listed with their state; download again once the batch is completed."
    ),
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "the dataset ZIP",
            "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses({**COMMON, 404: NOT_FOUND, 422: "malformed request"}),
    },
)
def batch_dataset(
    batch_id: str,
    batches: Batches,
    tenant: Tenant,
    passed_only: Annotated[
        bool, Query(description="only the files of items whose S_CLIP reached the threshold (PRISM's filter)")
    ] = False,
) -> StreamingResponse:
    record = batches.record(batch_id, tenant)
    if record is None:
        raise BatchNotFound
    headers = {"Content-Disposition": f'attachment; filename="prism-batch-{batch_id}.zip"'}
    return StreamingResponse(batches.dataset(record, passed_only), media_type="application/zip", headers=headers)
