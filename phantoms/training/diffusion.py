"""The diffusion stage: PRISM's Algorithm 1 on the phantoms, run by ``prism finetune``'s trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import models.weights.offline  # noqa: F401  (before diffusers/transformers)
from models.request.params import FinetuneConfig
from models.training.finetune import Finetuner, read_examples
from models.training.stopping import StopSwitch
from phantoms.captions import training_caption
from phantoms.recipe import StageRecipe
from phantoms.training.data import CAPTIONS, findings_of


def noised_batch(
    latents: torch.Tensor, labels: np.ndarray, idx: np.ndarray, rng: np.random.Generator, alphas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(noisy latents, timesteps, noise, captions) for training rows ``idx``.

    10 % of captions are empty, for classifier-free guidance.
    """
    z0 = latents[idx]
    captions = ["" if rng.random() < 0.1 else training_caption(findings_of(labels[i]), rng) for i in idx]
    t = torch.from_numpy(rng.integers(0, 1000, len(idx))).to(z0.device)
    noise = torch.randn_like(z0)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, noise, captions


def diffusion_config(recipe: StageRecipe) -> FinetuneConfig:
    """The ``prism finetune`` settings of the diffusion stage (the model card prints them as flags)."""
    return FinetuneConfig(
        steps=recipe.steps,
        batch_size=recipe.batch,
        learning_rate=recipe.lr,
        lr_schedule="cosine",
        warmup_steps=100,
        caption_dropout=0.1,
        train_text_encoder=True,
        max_grad_norm=1.0,
        cache_latents=True,
        checkpoint_every=250,
        seed=3,
    )


def finetune_diffusion(
    base: Path,
    phantoms: Path,
    work: Path,
    out: Path,
    recipe: StageRecipe,
    device: torch.device,
    stop: StopSwitch | None = None,
) -> Finetuner:
    """Algorithm 1 on the phantoms: the same reader and trainer as ``prism finetune``; the
    returned run holds the cached latents the attention stage reuses."""
    examples = read_examples(phantoms, phantoms / CAPTIONS)
    run = Finetuner(base, examples, work, diffusion_config(recipe), str(device), stop)
    if run.step < run.config.steps:
        run.run()
    run.export(work / "out", full_model=True)
    return run
