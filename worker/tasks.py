"""The RQ job function (named by ``service.contract.jobs.TASK``). It runs inside the long-lived
worker, which installed its runner."""

from __future__ import annotations

from rq import get_current_job

from worker.runner import JobRunner

_runner: JobRunner | None = None


def install(runner: JobRunner) -> None:
    """Called once by the worker after loading the model."""
    global _runner
    _runner = runner


def run_counterfactual(image: str, request: dict, edit: dict, mask: str | None = None) -> dict:
    """One job: ``image`` (and ``mask``) name the input's blobs, ``edit`` is what the API resolved
    the client's ``request`` to (the request itself only says where webhooks go, which the contract
    reads from the job). The runner reads these arguments from the job itself, as it does for the
    jobs of a batch (see ``worker.main``)."""
    if _runner is None:
        raise RuntimeError("no model loaded in this process: run jobs with `prism worker`")
    return _runner.run(get_current_job())
