"""The multipart form of ``POST /counterfactual``: the job request's fields plus the image.

Its fields, defaults, bounds and descriptions are :class:`~service.contract.jobs.JobRequest`'s
(the engine's :class:`~models.request.params.EditOptions` and the prompts): declared once. Unknown
fields are refused with a 422 naming them.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated

from fastapi import UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import Field, ValidationError, WithJsonSchema

from models.request.errors import InvalidInput
from models.request.resolve import EditRequest
from service.contract.jobs import JobRequest

FILE_PART = WithJsonSchema({"type": "string", "format": "binary"})
"""An optional file part's schema: a plain binary string, as OpenAPI's multipart encoding and
client generators expect (``UploadFile | None`` would be an anyOf, which they send as text)."""
LABELS_SYNTAX = 'a JSON object such as {"Support Devices": 1} or pairs such as "Support Devices=1; Edema=0"'


class CounterfactualForm(JobRequest):
    image: Annotated[
        UploadFile | None,
        FILE_PART,
        Field(
            description="chest X-ray: PNG (8/16-bit), JPEG or DICOM (detected from the content); or give "
            "source and study_uid instead",
        ),
    ] = None
    mask: Annotated[
        UploadFile | None,
        FILE_PART,
        Field(
            description="guided: the anatomy to keep, a PNG the size of the image (nonzero pixels are kept)",
        ),
    ] = None
    findings: Annotated[
        str | None,
        Field(description=f"instead of prompts: the image's CheXpert labels (1, 0, -1 or blank), as {LABELS_SYNTAX}"),
    ] = None
    edit: Annotated[str | None, Field(description=f"with findings: the labels to change, as {LABELS_SYNTAX}")] = None

    def job_request(self) -> JobRequest:
        """The request the job carries; a 422 naming the field if the findings do not parse."""
        try:
            return JobRequest.model_validate(self.model_dump(exclude={"image", "mask"}))
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc


def _repeatable(annotation: object) -> bool:
    """A list or mapping field, which a client may send as repeated parts."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return any(
        typing.get_origin(a) in (tuple, list, dict) for a in (typing.get_args(annotation) if union else (annotation,))
    )


REPEATABLE = frozenset(name for name, f in CounterfactualForm.model_fields.items() if _repeatable(f.annotation))
"""Fields that may come as repeated parts (``self_replace_steps=0.4`` twice); any other field sent
twice is refused rather than one of its values silently kept."""


class BatchForm(EditRequest):
    """The multipart form of ``POST /batches``: the ZIP, its manifest, and the edit and options
    every row shares (a row's own cells take precedence)."""

    images: Annotated[
        UploadFile | None,
        FILE_PART,
        Field(
            description="a ZIP of the images (PNG, JPEG or DICOM), in any folders; not with a manifest of studies",
        ),
    ] = None
    manifest: Annotated[
        UploadFile,
        Field(
            description="CSV, one row per image: `Path` (its name in the ZIP), or `study_uid` (and optional "
            "`series_uid`, `sop_uid`: a study of `source`, its frontal radiograph used), and either CheXpert "
            "condition columns (1, 0, -1 or blank) or `original_prompt`/`caption` and `edit_prompt` columns; an "
            "`edit` column overrides `edit` per row",
            json_schema_extra={"format": "binary"},
        ),
    ]
    findings: Annotated[
        str | None, Field(description="not used by a batch: the findings are the manifest's condition columns")
    ] = None
    edit: Annotated[
        str | None, Field(description=f"with condition columns: the labels to change in every row, as {LABELS_SYNTAX}")
    ] = None
    webhook: Annotated[
        str | None,
        Field(max_length=2000, description="http(s) URL that receives `batch.completed` once every item has ended"),
    ] = None
    source: Annotated[
        str | None,
        Field(max_length=100, description="with a manifest of studies: the PACS endpoint they are taken from"),
    ] = None
    store_to: Annotated[
        str | None,
        Field(max_length=100, description="a PACS endpoint each item's DICOM outputs are stored into (DICOM inputs)"),
    ] = None

    def base_request(self) -> EditRequest:
        """What every row shares; a 422 naming the field if a value does not parse."""
        if self.findings:
            raise InvalidInput("findings", "a batch's findings are its manifest's condition columns, one row per image")
        try:
            fields = self.model_dump(exclude={"images", "manifest", "webhook", "findings", "source", "store_to"})
            request = EditRequest.model_validate(fields)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc
        return request
