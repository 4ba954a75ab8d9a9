"""Redis key names shared by the API and the workers (all under ``prism:``)."""

from __future__ import annotations

import hashlib

ALIVE_PREFIX = "prism:alive:"


def input_key(job_id: str) -> str:
    return f"prism:input:{job_id}"


def mask_key(job_id: str) -> str:
    """The uploaded anatomy mask of a guided job, if there is one."""
    return f"prism:mask:{job_id}"


def output_key(job_id: str, name: str) -> str:
    return f"prism:output:{job_id}:{name}"


def cancel_key(job_id: str) -> str:
    return f"prism:cancel:{job_id}"


def alive_key(queue_name: str, worker_name: str) -> str:
    """Heartbeat key of a worker serving ``queue_name``; it expires when the worker stops beating."""
    return f"{ALIVE_PREFIX}{queue_name}:{worker_name}"


def idempotency_key(owner: str, client_key: str) -> str:
    """Where the job id of an ``Idempotency-Key`` is kept (the client's key is hashed)."""
    return f"prism:idem:{owner}:{hashlib.sha256(client_key.encode()).hexdigest()}"


def jobs_index_key(owner: str) -> str:
    """A sorted set of the owner's job ids by submission time (``GET /jobs``)."""
    return f"prism:jobs:{owner}"


def recovery_lock(job_id: str, execution_id: str) -> str:
    """Taken once per lost execution, so concurrent recovery sweeps handle it once."""
    return f"prism:recover:{job_id}:{execution_id}"


RATE_LIMIT_PREFIX = "prism:rate"
