"""The RQ job function a job names (``service.contract.jobs.TASK``). ``prism worker`` takes its jobs
itself, in passes of one or more (``worker.main``), and never calls it: it is what a plain RQ worker
would run, and it says so."""

from __future__ import annotations


def run_counterfactual(image: str, request: dict, edit: dict, mask: str | None = None) -> dict:
    """``image`` (and ``mask``) name the input's blobs, ``edit`` is what the API resolved the
    client's ``request`` to."""
    raise RuntimeError("PRISM jobs need the model a `prism worker` holds: run them with `prism worker`")
