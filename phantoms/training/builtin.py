"""``prism train-builtin``: every stage not yet done, then the held-out measurements,
``training.json`` and ``MODEL_CARD.md``."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel

import models.weights.offline  # noqa: F401  (before diffusers/transformers)
from models.atomic import write_aside
from models.diffusion.components import load_parts
from models.scoring.classifier import FindingClassifier
from models.training.finetune import Finetuner
from models.training.stopping import StopSwitch
from phantoms import architecture
from phantoms.model_card import render_model_card
from phantoms.recipe import RECIPES, Recipe
from phantoms.training.attention import train_attention
from phantoms.training.data import CAPTIONS, build_dataset, build_regions, write_base, write_phantoms
from phantoms.training.diffusion import diffusion_config, finetune_diffusion
from phantoms.training.scorers import train_classifier, train_clip
from phantoms.training.vae import train_decoder, train_vae

EVAL_SEEDS = range(2_000_000, 2_000_064)
"""Held-out anatomies for the measurements written to training.json (the benchmark uses 1,000,000+)."""


@torch.no_grad()
def measure(out: Path) -> dict[str, float]:
    """Held-out figures for the model card: VAE round-trip error and classifier accuracy."""
    images, labels = build_dataset(len(EVAL_SEEDS), seeds=EVAL_SEEDS)
    x = torch.from_numpy(images).float()[:, None] / 255.0
    parts = load_parts(out)
    vae = parts.vae.eval()
    decoded = vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample
    classifier = FindingClassifier.load(out / "classifier.safetensors")
    predicted = torch.sigmoid(classifier(x)).numpy() > 0.5
    components = {
        "vae": vae,
        "unet": parts.unet,
        "text_encoder": parts.text_encoder,
        "clip": CLIPModel.from_pretrained(out / "clip"),
        "classifier": classifier,
    }
    return {
        "vae_roundtrip_l1": round(float((decoded.clamp(-1, 1) / 2 + 0.5 - x).abs().mean()), 4),
        "classifier_accuracy": round(float((predicted == (labels > 0.5)).mean()), 4),
        "held_out_images": len(EVAL_SEEDS),
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in components.items()},
    }


class TrainingLog:
    """``training.json``: the recipe, each stage's seconds (summed over sittings) and final loss."""

    def __init__(self, path: Path, recipe: Recipe) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        self.data["recipe"] = asdict(recipe)
        self.data.setdefault("stages", {})

    def timed(self, name: str, fn: Callable[[], object]):
        start = time.perf_counter()
        result = fn()
        stage = self.data["stages"].setdefault(name, {})
        stage["seconds"] = round(stage.get("seconds", 0.0) + time.perf_counter() - start, 1)
        loss = float(np.mean(result.losses[-100:])) if isinstance(result, Finetuner) else result
        if isinstance(loss, float):
            stage["final_loss"] = round(loss, 5)
        self.save()
        return result

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2))


def train_builtin(
    work: Path,
    out: Path,
    recipe: Recipe = RECIPES["cpu"],
    device: str = "cpu",
    workers: int | None = None,
    stop: StopSwitch | None = None,
) -> None:
    """Run every stage not yet done, then measure and write ``training.json`` and ``MODEL_CARD.md``.

    ``workers`` processes render the phantoms (default: one per core). A request to ``stop``
    ends the stage under way at a whole step, checkpointed (KeyboardInterrupt).
    """
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    record = TrainingLog(work / "training.json", recipe)
    record.data["finetune"] = diffusion_config(recipe.unet).model_dump(exclude={"validate_every"})
    on = torch.device(device)
    threads = f"cpu ({torch.get_num_threads()} threads)"
    record.data["device"] = torch.cuda.get_device_name(on) if on.type == "cuda" else threads
    workers = workers or os.cpu_count() or 1

    data = work / "data.npz"
    if not data.exists():
        images, labels = record.timed("data", lambda: build_dataset(recipe.images, workers=workers))
        write_aside(data, lambda aside: np.savez(aside, images=images, labels=labels))
    loaded = np.load(data)
    images, labels = loaded["images"], loaded["labels"]

    phantoms = work / "phantoms"
    if not (phantoms / CAPTIONS).exists():
        record.timed("captions", lambda: write_phantoms(images, labels, phantoms))
    if not (out / "vae" / "config.json").exists():
        record.timed("vae", lambda: train_vae(images, work, out, recipe.vae, on, stop))
    record.timed("decoder", lambda: train_decoder(images, work, out, recipe.decoder, on, stop))
    base = write_base(work / "base", out / "vae")
    diffusion = work / "finetune"
    run = record.timed("unet", lambda: finetune_diffusion(base, phantoms, diffusion, out, recipe.unet, on, stop))
    if not (work / "attention.done").exists():
        regions_path = work / "regions.npy"
        if regions_path.exists():
            regions = np.load(regions_path)
        else:
            n = min(recipe.region_images, len(images))
            regions = record.timed("regions", lambda: build_regions(n, workers=workers))
            write_aside(regions_path, lambda aside: np.save(aside, regions))
        tuned = diffusion / "out" / "model"
        latents = run.cached_latents
        weight = recipe.attention_weight
        record.timed(
            "attention",
            lambda: train_attention(tuned, latents, labels, regions, work, out, recipe.attention, weight, stop),
        )
        (work / "attention.done").touch()
    if not (out / "clip" / "config.json").exists():
        record.timed("clip", lambda: train_clip(images, labels, work, out, recipe.clip, on, stop))
    if not (out / "classifier.safetensors").exists():
        record.timed("classifier", lambda: train_classifier(images, labels, work, out, recipe.classifier, on, stop))
    record.data["local_blend"] = asdict(architecture.BLEND_MAPS)
    (out / "local_blend.json").write_text(json.dumps(record.data["local_blend"]))
    record.data["measured"] = measure(out)
    record.save()
    shutil.copy(record.path, out / "training.json")
    (out / "MODEL_CARD.md").write_text(render_model_card(record.data))
