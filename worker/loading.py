"""The models a worker holds, built from the settings: one helper for ``prism worker`` and
``prism edit`` (whose flags override the settings), so both load the same model the same way."""

from __future__ import annotations

import torch

from models.diffusion.compiled import compile_loops
from models.diffusion.components import ModelBundle, load_bundle
from models.scoring.classifier import FindingClassifier, configured_classifier
from service.contract.settings import Settings


def bundle_from_settings(settings: Settings) -> ModelBundle:
    """``PRISM_MODEL_DIR`` (the built-in model when unset), ``PRISM_UNET_WEIGHTS`` over it,
    ``PRISM_CLIP_MODEL``, on ``PRISM_DEVICE`` with the UNet in ``PRISM_DTYPE``, run by
    ``PRISM_CPU_THREADS`` threads (a process-wide torch setting, made here for the process that
    holds the model), its inversion loops compiled as ``PRISM_COMPILE`` asks for batches up to
    ``PRISM_WORKER_PACK``."""
    if settings.cpu_threads is not None:
        torch.set_num_threads(settings.cpu_threads)
    bundle = load_bundle(
        settings.model_dir, settings.unet_weights, settings.clip_model, device=settings.device, dtype=settings.dtype
    )
    return compile_loops(bundle, settings.compile, settings.worker_pack)


def classifier_from_settings(settings: Settings) -> FindingClassifier | None:
    """``PRISM_CLASSIFIER``, else the model directory's own classifier, else none."""
    return configured_classifier(settings.classifier, settings.model_dir)
