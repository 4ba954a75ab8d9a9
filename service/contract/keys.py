"""Redis key names shared by the API and the workers (all under ``prism:``)."""

from __future__ import annotations

import hashlib

ALIVE_PREFIX = "prism:alive:"


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


def batch_key(batch_id: str) -> str:
    """A batch's record (JSON): its items, each with its job id or why it was skipped."""
    return f"prism:batch:{batch_id}"


def batch_cancel_key(batch_id: str) -> str:
    """Set while a batch is being canceled: a worker takes none of its jobs from then on."""
    return f"prism:batch:{batch_id}:cancel"


def batch_ended_key(batch_id: str) -> str:
    """The set of a batch's job ids that have ended (succeeded, failed or canceled)."""
    return f"prism:batch:{batch_id}:ended"


def batch_done_key(batch_id: str) -> str:
    """Set once, by whoever ends a batch's last job: ``batch.completed`` is sent once."""
    return f"prism:batch:{batch_id}:done"


def batches_index_key(owner: str) -> str:
    """A sorted set of the owner's batch ids by submission time (``GET /batches``)."""
    return f"prism:batches:{owner}"


def recovery_lock(job_id: str, execution_id: str) -> str:
    """Taken once per lost execution, so concurrent recovery sweeps handle it once."""
    return f"prism:recover:{job_id}:{execution_id}"


RATE_LIMIT_PREFIX = "prism:rate"
SWEEP_LOCK = "prism:sweep"
"""Held by the worker sweeping the blob store this period (``service.contract.blobs.sweep``)."""
