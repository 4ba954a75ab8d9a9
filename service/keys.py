"""Redis key names shared by the API and the workers (all under ``prism:``)."""

ALIVE_PREFIX = "prism:alive:"


def input_key(job_id: str) -> str:
    return f"prism:input:{job_id}"


def output_key(job_id: str, name: str) -> str:
    return f"prism:output:{job_id}:{name}"


def cancel_key(job_id: str) -> str:
    return f"prism:cancel:{job_id}"


def alive_key(queue_name: str, worker_name: str) -> str:
    """Heartbeat key of a worker serving ``queue_name``; it expires when the worker stops beating."""
    return f"{ALIVE_PREFIX}{queue_name}:{worker_name}"
