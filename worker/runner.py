"""Adapts the engine to jobs: input from Redis, progress into job meta, outputs back to Redis."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rq.job import Job

from models.errors import ImageError, InvalidInput
from models.geometry import decode_image
from models.inversion import InversionCache
from models.loading import ModelBundle
from models.params import EditParams
from models.pipeline import generate_counterfactual
from service.keys import cancel_key, output_key
from service.settings import Settings

log = logging.getLogger("prism.worker")
RESULT_FIELDS = (
    "s_clip",
    "passed",
    "s_clip_threshold",
    "similarities",
    "score_reference",
    "chosen_self_replace",
    "candidates",
    "timings",
)


class JobCanceled(Exception):
    """Raised from the progress callback when the client canceled the job."""


def _failure(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def params_from_request(request: dict) -> EditParams:
    """EditParams from the JSON job arguments (lists become tuples)."""
    fields = {k: v for k, v in request.items() if k not in ("original_prompt", "edit_prompt")}
    for name in ("self_replace_steps", "blend_words", "reweight_words"):
        if fields.get(name) is not None:
            fields[name] = tuple(fields[name])
    return EditParams(**fields)


class JobRunner:
    """Holds the model bundle for the worker's lifetime and runs one job at a time."""

    def __init__(self, bundle: ModelBundle, settings: Settings) -> None:
        self.bundle = bundle
        self.settings = settings
        cache_dir = settings.inversion_cache_dir
        self.cache = InversionCache(Path(cache_dir)) if cache_dir else None

    def run(self, job: Job, input_key: str, request: dict) -> dict:
        redis = job.connection
        data = redis.get(input_key)
        if data is None:
            return _failure("input_expired", "the uploaded image is no longer stored; submit the job again")
        try:
            image = decode_image(data)
            params = params_from_request(request)
        except ImageError as exc:
            return _failure("invalid_image", str(exc))
        except (InvalidInput, TypeError) as exc:
            return _failure("invalid_parameters", str(exc))

        last_save = 0.0

        def progress(phase: str, step: int, total: int) -> None:
            nonlocal last_save
            if redis.exists(cancel_key(job.id)):
                raise JobCanceled
            now = time.monotonic()
            if step in (0, 1, total) or now - last_save > 0.5:
                job.meta["progress"] = {"phase": phase, "step": step, "total": total}
                job.save_meta()
                last_save = now

        log.info("job %s: started", job.id)
        try:
            progress("decode", 0, 1)
            result = generate_counterfactual(
                self.bundle,
                image,
                request["original_prompt"],
                request["edit_prompt"],
                params,
                cache=self.cache,
                callback=progress,
            )
        except InvalidInput as exc:
            return _failure("invalid_parameters", f"{exc.field}: check the request")
        except JobCanceled:
            redis.delete(input_key, cancel_key(job.id))
            log.info("job %s: canceled", job.id)
            return {"canceled": True}
        ttl = self.settings.job_ttl_s
        with redis.pipeline() as pipe:
            for name, content in result.files().items():
                pipe.set(output_key(job.id, name), content, ex=ttl)
            pipe.delete(input_key)
            pipe.execute()
        log.info("job %s: done in %.1f s", job.id, sum(result.report["timings"].values()))
        return {"result": {k: result.report[k] for k in RESULT_FIELDS}}
