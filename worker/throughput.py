"""``prism bench-throughput``: jobs per hour of one worker at several pack sizes, through the
worker's own path (jobs enqueued on Redis as the API enqueues them, their inputs in the blob
store, a ``PrismWorker`` taking them in packs of ``PRISM_WORKER_PACK``, results stored and read
back).

Every pack size runs the same jobs, so each job's S_CLIP, chosen candidate and counterfactual
are compared with the pack-of-one run: the table says how far packing moves results.
"""

from __future__ import annotations

import os
import socket
import statistics
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pydantic import BaseModel
from redis import Redis

from models.diffusion.components import ModelBundle
from models.evaluation.speed import BenchSetup
from models.imaging.files import decode_image
from models.request.report import EditReport
from models.request.resolve import ResolvedEdit
from service.contract.blobs import BlobStore, file_blob, input_blob
from service.contract.jobs import JobRequest, enqueue, fetch_job, job_queue
from service.contract.settings import Settings
from worker.main import PrismWorker
from worker.runner import JobRunner


class ThroughputRow(BaseModel):
    pack: int
    jobs: int
    seconds: float
    jobs_per_hour: float
    seconds_per_job: float
    running_s: float
    speedup: float
    same_candidate: bool
    max_s_clip_diff: float
    max_counterfactual_diff: float


class ThroughputReport(BenchSetup):
    compile: str
    inversion: str
    rows: list[ThroughputRow]

    def markdown(self) -> str:
        head = (
            "| pack | jobs | s | jobs/hour | s per job | s running, per job | × pack 1 | same candidate "
            "| max ΔS_CLIP | max Δcounterfactual |\n" + "| --- " * 10 + "|\n"
        )
        rows = "".join(
            f"| {r.pack} | {r.jobs} | {r.seconds:.1f} | {r.jobs_per_hour:.0f} | {r.seconds_per_job:.2f} "
            f"| {r.running_s:.1f} | {r.speedup:.2f} | {'yes' if r.same_candidate else 'no'} "
            f"| {r.max_s_clip_diff:.1e} | {r.max_counterfactual_diff:.1e} |\n"
            for r in self.rows
        )
        return (
            f"Device: {self.device}; UNet {self.dtype}, inversion loops {self.compile}; model {self.model} at "
            f"{self.resolution}²; {self.steps} steps, {self.inversion} inversion, sweep {self.sweep}; one worker, "
            "every job another image, no inversion cache, after one untimed job. s: from the first job's start "
            "to the last one's end. Δ: against the same job at pack 1 (counterfactual intensities in [0, 1]; "
            "over the jobs pack 1 ran).\n\n" + head + rows
        )


@dataclass
class JobRun:
    report: EditReport
    counterfactual: np.ndarray
    started: datetime
    ended: datetime


def measure_throughput(
    bundle: ModelBundle,
    jobs: Sequence[tuple[bytes, ResolvedEdit]],
    pack_sizes: Sequence[int],
    settings: Settings,
    progress: Callable[[], None] | None = None,
    baseline_jobs: int | None = None,
) -> ThroughputReport:
    """Run ``jobs`` (an input file and its edit each) once per pack size, after one untimed job,
    through the Redis and blob store of ``settings``; ``progress`` is called as each job ends.
    Pack 1, the reference, runs always, and only the first ``baseline_jobs`` of them if given (a
    GPU's minutes are few)."""
    redis = Redis.from_url(settings.redis_url)
    blobs = BlobStore.from_settings(settings)
    _run(redis, blobs, settings, bundle, jobs[:1], 1, "warm-up")
    runs = {
        b: _run(redis, blobs, settings, bundle, jobs[:baseline_jobs] if b == 1 else jobs, b, f"pack-{b}", progress)
        for b in sorted({1, *pack_sizes})
    }
    params = jobs[0][1].params
    return ThroughputReport(
        **BenchSetup.of(bundle, params),
        compile=bundle.compile,
        inversion=params.inversion,
        rows=[_row(pack, run, runs[1]) for pack, run in runs.items()],
    )


def _run(
    redis: Redis,
    blobs: BlobStore,
    base: Settings,
    bundle: ModelBundle,
    jobs: Sequence[tuple[bytes, ResolvedEdit]],
    pack: int,
    tag: str,
    progress: Callable[[], None] | None = None,
) -> list[JobRun]:
    """Enqueue ``jobs`` on a queue of their own, let one worker of pack ``pack`` take them all."""
    settings = base.model_copy(
        update={"queue_name": f"throughput-{tag}", "worker_pack": pack, "inversion_cache_dir": None}
    )
    queue = job_queue(redis, settings)
    ids = []
    for image, edit in jobs:
        job_id = uuid.uuid4().hex
        blobs.put(input_blob(job_id), image)
        enqueue(queue, job_id, JobRequest(), edit, "bench", settings)
        ids.append(job_id)
    runner = JobRunner(bundle, settings, blobs=blobs)
    name = f"{socket.gethostname()}.{os.getpid()}.{tag}"
    worker = _Worker([queue], connection=redis, runner=runner, settings=settings, name=name, progress=progress)
    worker.work(burst=True, with_scheduler=False, logging_level="WARNING")
    out = []
    for job_id in ids:
        job = fetch_job(redis, job_id)
        if job.return_value() is None:
            raise RuntimeError(f"job {job_id} of {tag} did not succeed: {job.get_status()}")
        png = blobs.get(file_blob(job_id, "counterfactual.png"))
        image = decode_image(png, settings.max_image_pixels).pixels
        out.append(JobRun(EditReport.model_validate(job.return_value()), image, job.started_at, job.ended_at))
    return out


class _Worker(PrismWorker):
    """The worker, telling ``progress`` as each job ends."""

    def __init__(self, *args, progress: Callable[[], None] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def _ended(self, job, data: dict) -> None:
        super()._ended(job, data)
        if self.progress:
            self.progress()


def _row(pack: int, run: list[JobRun], reference: list[JobRun]) -> ThroughputRow:
    seconds = (max(j.ended for j in run) - min(j.started for j in run)).total_seconds()
    per_hour = 3600 * len(run) / seconds
    base_seconds = (max(j.ended for j in reference) - min(j.started for j in reference)).total_seconds()
    pairs = list(zip(run, reference, strict=False))  # the reference may run fewer jobs
    return ThroughputRow(
        pack=pack,
        jobs=len(run),
        seconds=round(seconds, 2),
        jobs_per_hour=round(per_hour, 1),
        seconds_per_job=round(seconds / len(run), 3),
        running_s=round(statistics.mean((j.ended - j.started).total_seconds() for j in run), 2),
        speedup=round(per_hour / (3600 * len(reference) / base_seconds), 3),
        same_candidate=all(a.report.chosen_self_replace == b.report.chosen_self_replace for a, b in pairs),
        max_s_clip_diff=max(abs(a.report.s_clip - b.report.s_clip) for a, b in pairs),
        max_counterfactual_diff=max(float(np.abs(a.counterfactual - b.counterfactual).max()) for a, b in pairs),
    )
