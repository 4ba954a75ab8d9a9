"""The multipart form of ``POST /counterfactual``: the job request's fields plus the image.

Its fields, defaults, bounds and descriptions are :class:`~service.contract.jobs.JobRequest`'s
(the engine's :class:`~models.params.EditOptions` and the prompts): declared once. Unknown
fields are refused with a 422 naming them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import UploadFile
from pydantic import Field

from service.contract.jobs import JobRequest


class CounterfactualForm(JobRequest):
    image: Annotated[
        UploadFile,
        Field(description="chest X-ray, PNG (8/16-bit) or JPEG", json_schema_extra={"format": "binary"}),
    ]

    def job_request(self) -> JobRequest:
        return JobRequest.model_validate(self.model_dump(exclude={"image"}))
