"""The page at ``/`` (plain HTML, CSS and JavaScript shipped in ``service/api/static``, no build
step, nothing from another origin), the service's public settings, and DICOM previews for it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, UploadFile
from fastapi.responses import FileResponse, Response

from models.request.findings import CONDITIONS
from models.request.params import EditParams
from service.api.deps import Admitted, SettingsDep, one_part_per_field, require_multipart
from service.api.docs import error_responses
from service.api.schemas import ServiceInfo
from service.api.uploads import dicom_preview

STATIC = Path(__file__).resolve().parent.parent / "static"
router = APIRouter()


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/service-info", operation_id="service_info", tags=["health"], response_model=ServiceInfo)
def service_info(request: Request, settings: SettingsDep) -> ServiceInfo:
    """Whether API keys are required, the upload limits and S_CLIP's threshold (no key needed)."""
    return ServiceInfo(
        auth=settings.auth == "on",
        max_upload_bytes=settings.max_upload_bytes,
        max_image_pixels=settings.max_image_pixels,
        s_clip_threshold=EditParams().s_clip_threshold,
        conditions=list(CONDITIONS),
        version=request.app.version,
    )


@router.post(
    "/preview",
    operation_id="preview_dicom",
    tags=["counterfactuals"],
    summary="An 8-bit PNG of a DICOM image as the model will see it (for showing an upload)",
    dependencies=[Depends(require_multipart), Depends(one_part_per_field)],
    response_class=Response,
    responses={
        200: {"description": "the image", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
        **error_responses(
            {
                401: "missing or invalid X-API-Key",
                413: "too large",
                415: "not a multipart form, or not DICOM",
                422: "unreadable",
                429: "rate limited",
                503: "Redis unreachable",
            }
        ),
    },
)
def preview(
    image: Annotated[UploadFile, File(description="a DICOM file", json_schema_extra={"format": "binary"})],
    settings: SettingsDep,
    admission: Admitted,
) -> Response:
    png = dicom_preview(image.file.read(settings.max_upload_bytes + 1), settings.max_image_pixels)
    admission.admit()
    return Response(png, media_type="image/png")
