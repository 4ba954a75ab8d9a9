"""What the OpenAPI description says beyond the models: error responses, headers, the docs pages.

``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) load their scripts from this server, from the
fastapi-offline package, so they work on a network with no internet; nothing they load comes
from another origin.
"""

from __future__ import annotations

from typing import Any

from service.api.errors import ErrorBody

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before the next request", "schema": {"type": "integer"}}}
TAGS = [
    {"name": "counterfactuals", "description": "Submit an image and prompts (or findings) for a counterfactual."},
    {"name": "jobs", "description": "Status, progress, scores, result files and cancellation of jobs."},
    {
        "name": "batches",
        "description": "A ZIP of images and a manifest as one submission; its progress; its dataset as one ZIP.",
    },
    {"name": "health", "description": "Probes for orchestrators and load balancers."},
    {"name": "observability", "description": "Prometheus metrics."},
]


def error_responses(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses in the one error shape; 429 and 503 carry ``Retry-After``."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status, description in described.items():
        responses[status] = {"model": ErrorBody, "description": description}
        if status in (429, 503):
            responses[status]["headers"] = RETRY_AFTER
    return responses


def accepted(what: str) -> dict[str, Any]:
    """The 202 of a submission: where to poll ``what``, and when."""
    return {
        "description": f"Accepted: follow the {what} at `Location`, after `Retry-After` seconds",
        "headers": {
            "Location": {"description": f"the {what}'s status URL", "schema": {"type": "string"}},
            **RETRY_AFTER,
        },
    }
