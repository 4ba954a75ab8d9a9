"""Train the built-in model on phantoms: VAE, text-conditioned UNet, CLIP scorer, classifier.

The diffusion stage is PRISM's Algorithm 1 as any user runs it (:class:`models.training.finetune.Finetuner`,
``prism finetune``): the phantoms are written as PNGs with a captions table, and the UNet and
text encoder of a base directory (the trained VAE, the rest freshly initialised) are fine-tuned on
them. The phantom-specific parts (VAE, attention supervision, CLIP scorer, classifier) are here.

Seeded and resumable: each stage checkpoints to ``work`` (weights, optimiser and random state,
so the steps redone after a resume are the ones an uninterrupted run takes) and is skipped once
its outputs exist, so ``prism train-builtin`` can be interrupted and run again. It writes every
file of the shipped model (``models/assets/builtin``): the components in the diffusers/transformers
layout that ``load_bundle`` reads, ``local_blend.json``, ``training.json`` (the recipe it ran, the device,
per-stage seconds and final losses, held-out measurements) and a ``MODEL_CARD.md`` rendered from it.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPModel, CLIPTextModel

import models.weights.offline  # noqa: F401  (before diffusers/transformers)
from models.diffusion.attention_control import ControlledAttnProcessor
from models.diffusion.components import write_clip_preprocessor
from models.diffusion.ddim import make_scheduler
from models.request.constants import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, TOKEN_WINDOW
from models.request.params import FinetuneConfig
from models.request.tokenizer import ASSETS, clip_tokenizer
from models.request.words import prompt_words, word_token_indices
from models.scoring.classifier import FindingClassifier, builtin_classifier_config
from models.scoring.clip import projected_features
from models.training.atomic import write_aside
from models.training.finetune import Finetuner, read_examples, save_unet
from models.training.stopping import StopSwitch
from phantoms import architecture
from phantoms.captions import NAMES, explicit_caption, prism_caption, training_caption, typed_caption
from phantoms.model_card import render_model_card
from phantoms.recipe import RECIPES, TRAIN_SEEDS, Recipe, StageRecipe
from phantoms.render import FINDINGS, Findings, region_fractions, training_phantom

log = logging.getLogger("prism.train")
SIZE = architecture.SIZE
EVAL_SEEDS = range(2_000_000, 2_000_064)
"""Held-out anatomies for the measurements written to training.json (the benchmark uses 1,000,000+)."""


def _pool(workers: int) -> ProcessPoolExecutor:
    """Rendering is per-seed numpy work: spawned processes import only :mod:`phantoms.render`."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def build_dataset(
    n: int, size: int = SIZE, seeds: range = TRAIN_SEEDS, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, size, size) uint8 and findings (n, 3) for the first n anatomies of ``seeds``."""
    images = np.empty((n, size, size), np.uint8)
    labels = np.empty((n, len(FINDINGS)), np.float32)
    with _pool(workers) as pool:
        for i, (image, findings) in enumerate(pool.map(training_phantom, seeds[:n], repeat(size), chunksize=64)):
            images[i], labels[i] = image, findings.as_vector()
    return images, labels


def build_regions(n: int, size: int = SIZE, side: int = 16, workers: int = 1) -> np.ndarray:
    """Area fraction (n, 3, side, side) of each finding's region for training seeds 0..n-1."""
    with _pool(workers) as pool:
        return np.stack(list(pool.map(region_fractions, range(n), repeat(size), repeat(side), chunksize=16)))


CAPTIONS = "captions.csv"


def write_phantoms(images: np.ndarray, labels: np.ndarray, directory: Path) -> Path:
    """The training set as ``prism finetune`` reads any data set: PNGs and a ``Path,caption`` table.

    Four rows per image, so that a run's draw among them weighs the wordings as
    :func:`phantoms.captions.training_caption` does: the explicit form twice, the PRISM template
    once, one typed variant. The table is renamed into place last, so its presence means done.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)

    def write(partial: Path) -> None:
        with partial.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Path", "caption"])
            for i, (image, row) in enumerate(zip(images, labels, strict=True)):
                name = f"{i:06d}.png"
                Image.fromarray(image).save(directory / name)
                findings = _findings(row)
                explicit = explicit_caption(findings)
                for text in (explicit, explicit, prism_caption(findings), typed_caption(findings, rng)):
                    writer.writerow([name, text])

    return write_aside(directory / CAPTIONS, write)


def write_base(directory: Path, vae_dir: Path) -> Path:
    """A diffusers SD directory to fine-tune from: the trained VAE, a freshly initialised UNet and
    text encoder (seeded), the CLIP tokenizer and the DDIM scheduler; written aside, then renamed."""

    def write(partial: Path) -> None:
        torch.manual_seed(3)
        architecture.unet().save_pretrained(partial / "unet")
        architecture.text_encoder().save_pretrained(partial / "text_encoder")
        _save_tokenizer(partial / "tokenizer")
        make_scheduler().save_pretrained(partial / "scheduler")
        shutil.copytree(vae_dir, partial / "vae")

    return directory if directory.is_dir() else write_aside(directory, write)


def _findings(row: np.ndarray) -> Findings:
    return Findings(*(bool(v) for v in row))


class Stage:
    """A resumable training loop: ``step_fn(step)`` returns the loss; checkpoints every ``every``.

    A checkpoint holds the modules, the optimiser and the random state the steps draw from
    (``rng``, the stage's batches and captions, and torch's generators, for noise and latent
    samples), so a resumed stage redoes the steps after it exactly as an uninterrupted one did.
    A request to ``stop`` lets the step under way finish (each ``step_fn`` updates the weights
    itself, so it is never cut short), then checkpoints and raises KeyboardInterrupt: no step is lost.
    """

    def __init__(
        self,
        name: str,
        work: Path,
        modules: dict[str, torch.nn.Module],
        optimizer,
        recipe: StageRecipe,
        rng: np.random.Generator,
        stop: StopSwitch | None = None,
    ) -> None:
        self.name, self.modules, self.optimizer, self.recipe, self.rng = name, modules, optimizer, recipe, rng
        self.stop = stop or StopSwitch()
        self.path = work / f"{name}.ckpt"
        self.start = 0
        self.smoothed: float | None = None
        if self.path.exists():
            state = torch.load(self.path, weights_only=True, map_location="cpu")
            for key, module in modules.items():
                module.load_state_dict(state[key])
            optimizer.load_state_dict(state["optimizer"])
            self.start, self.smoothed = state["step"], state.get("smoothed_loss")
            if "numpy_rng" in state:
                rng.bit_generator.state = state["numpy_rng"]
                torch.set_rng_state(state["torch_rng"])
                if state["cuda_rng"] and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(state["cuda_rng"])
            log.info("%s: resuming at step %d", name, self.start)

    def _random_state(self) -> dict:
        return {
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def run(self, step_fn: Callable[[int], float], every: int = 200) -> float:
        """Train to the recipe's step count; returns the final loss (exponential moving average)."""
        steps, lr = self.recipe.steps, self.recipe.lr
        t0 = time.perf_counter()
        for step in range(self.start, steps):
            if self.stop.asked:
                self._save(step)
                log.info("%s: stopped at step %d/%d", self.name, step, steps)
                raise KeyboardInterrupt
            warm = min(1.0, (step + 1) / 100)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            loss = step_fn(step)
            self.smoothed = loss if self.smoothed is None else 0.98 * self.smoothed + 0.02 * loss
            if (step + 1) % every == 0 or step + 1 == steps:
                self._save(step + 1)
                rate = (time.perf_counter() - t0) / (step + 1 - self.start)
                log.info("%s: step %d/%d loss %.5f (%.2f s/step)", self.name, step + 1, steps, self.smoothed, rate)
        return float(self.smoothed)

    def _save(self, step: int) -> None:
        state = {k: m.state_dict() for k, m in self.modules.items()}
        extra = {"optimizer": self.optimizer.state_dict(), "step": step, "smoothed_loss": self.smoothed}
        write_aside(self.path, functools.partial(torch.save, {**state, **extra, **self._random_state()}))


def _batch(images: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, len(images), size)


def train_vae(
    images: np.ndarray,
    work: Path,
    out: Path,
    recipe: StageRecipe,
    device: torch.device,
    stop: StopSwitch | None = None,
) -> float:
    torch.manual_seed(1)
    vae = architecture.vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
    rng = np.random.default_rng(2)
    stage = Stage("vae", work, {"vae": vae}, opt, recipe, rng, stop)

    def step_fn(step: int) -> float:
        idx = _batch(images, rng, recipe.batch)
        y0, x0 = rng.integers(0, SIZE - 64, 2)
        x = torch.from_numpy(images[idx, y0 : y0 + 64, x0 : x0 + 64]).to(device).float()[:, None] / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(rec, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    loss = stage.run(step_fn)
    vae.eval()
    with torch.no_grad():
        x = torch.from_numpy(images[:256]).to(device).float()[:, None] / 127.5 - 1
        std = torch.cat([vae.encode(b).latent_dist.mean for b in x.split(64)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.to("cpu").save_pretrained(out / "vae")
    return loss


def train_decoder(
    images: np.ndarray,
    work: Path,
    out: Path,
    recipe: StageRecipe,
    device: torch.device,
    stop: StopSwitch | None = None,
) -> float:
    """Fine-tune the VAE's decoder alone on whole images, decoding the posterior mean as an edit does.

    The VAE stage's decoder learns from sampled latents of 64x64 crops and stays blurred: a 1-px
    lead comes back as a faint wide band, and the residual output turns that into a bright core
    and a dark rim around a removed lead even for a perfect edit. The encoder is frozen, so the
    latent space, and every stage trained on it, is unchanged (the same idea as Stable Diffusion's
    fine-tuned ft-MSE decoder).
    """
    loaded = AutoencoderKL.from_pretrained(out / "vae")
    vae = architecture.vae()  # a fresh config: from_pretrained's records the local path it was read from
    vae.load_state_dict(loaded.state_dict())
    vae.register_to_config(scaling_factor=loaded.config.scaling_factor)
    vae.to(device).requires_grad_(False)
    trained = {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}
    for module in trained.values():
        module.requires_grad_(True)
    params = [p for module in trained.values() for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    rng = np.random.default_rng(6)
    stage = Stage("decoder", work, trained, opt, recipe, rng, stop)

    def step_fn(step: int) -> float:
        x = torch.from_numpy(images[_batch(images, rng, recipe.batch)]).to(device).float()[:, None] / 127.5 - 1
        with torch.no_grad():
            latent = vae.encode(x).latent_dist.mean
        loss = F.l1_loss(vae.decode(latent).sample, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    loss = stage.run(step_fn)
    vae.to("cpu").eval()
    write_aside(out / "vae", vae.save_pretrained)
    return loss


def _save_tokenizer(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS / name, directory / name)


def _tokens(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=TOKEN_WINDOW, truncation=True, return_tensors="pt"
    ).input_ids


def _noised_batch(
    latents: torch.Tensor, labels: np.ndarray, idx: np.ndarray, rng: np.random.Generator, tokenizer, alphas
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(noisy latents, timesteps, noise, caption token ids, captions) for training rows ``idx``.

    10 % of captions are empty, for classifier-free guidance.
    """
    z0 = latents[idx]
    captions = ["" if rng.random() < 0.1 else training_caption(_findings(labels[i]), rng) for i in idx]
    ids = _tokens(tokenizer, captions).to(z0.device)
    t = torch.from_numpy(rng.integers(0, 1000, len(idx))).to(z0.device)
    noise = torch.randn_like(z0)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, noise, ids, captions


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


class _CrossAttentionRecorder:
    """Keeps every cross-attention layer's head-averaged probabilities, with their gradients."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def needs_probs(self, is_cross: bool, queries: int) -> bool:
        return is_cross

    def self_attention_rows(self, queries: int, batch: int) -> None:
        return None

    def __call__(self, probs: torch.Tensor, is_cross: bool, batch: int) -> torch.Tensor:
        if is_cross:
            self.maps.append(probs.view(batch, -1, *probs.shape[1:]).mean(1))
        return probs


def finding_tokens(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, 3, TOKEN_WINDOW) 0/1: the token positions of each finding's words in each caption
    (all zeros where the caption does not name the finding, with or without)."""
    tokens = torch.zeros(len(captions), len(FINDINGS), TOKEN_WINDOW)
    for b, caption in enumerate(captions):
        words = set(prompt_words(caption))
        for f, name in enumerate(FINDINGS):
            finding_words = prompt_words(NAMES[name])
            if all(w in words for w in finding_words):
                tokens[b, f, word_token_indices(tokenizer, caption, finding_words, "caption")] = 1
    return tokens


def attention_loss(maps: list[torch.Tensor], tokens: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each named finding's region under its words' attention over the map,
    averaged over every (map, caption, named finding).

    ``maps`` are (B, pixels, TOKEN_WINDOW) head-averaged probabilities; ``tokens`` comes from
    :func:`finding_tokens`; ``regions`` (B, 3, s, s) holds area fractions, pooled to each map's
    size and normalised to a distribution. The loss is lowest when a finding's words attend evenly
    over its whole region and nowhere else, as a large model learns from data; LocalBlend's masks
    then cover the finding.
    """
    named = tokens.amax(-1)
    if not named.any():
        return maps[0].sum() * 0
    terms = []
    for m in maps:
        side = int(round(m.shape[1] ** 0.5))
        target = F.adaptive_avg_pool2d(regions, side).flatten(2).to(m.dtype)
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-6)
        a = torch.einsum("bqt,bft->bfq", m, tokens.to(m.dtype))
        log_share = torch.log(a / a.sum(-1, keepdim=True).clamp_min(1e-30) + 1e-8)
        terms.append((-(target * log_share).sum(-1) * named).sum())
    return torch.stack(terms).sum() / (named.sum() * len(maps))


def train_attention(
    model: Path,
    latents: torch.Tensor,
    labels: np.ndarray,
    regions: np.ndarray,
    work: Path,
    out: Path,
    recipe: StageRecipe,
    weight: float,
    stop: StopSwitch | None = None,
) -> float:
    """Fine-tune ``model``'s UNet and text encoder with ε-MSE plus ``weight * attention_loss``."""
    torch.manual_seed(9)
    device = latents.device
    unet = UNet2DConditionModel.from_pretrained(model / "unet").to(device)
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder").to(device)
    recorder = _CrossAttentionRecorder()
    default_processors = unet.attn_processors
    unet.set_attn_processor(ControlledAttnProcessor(recorder))
    tokenizer = clip_tokenizer()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-2)
    rng = np.random.default_rng(10)
    stage = Stage("attention", work, {"unet": unet, "text_encoder": text_encoder}, opt, recipe, rng, stop)
    alphas = make_scheduler().alphas_cumprod.to(device)
    region_t = torch.from_numpy(regions).float().to(device)

    def step_fn(step: int) -> float:
        idx = _batch(regions, rng, recipe.batch)
        zt, t, noise, ids, captions = _noised_batch(latents, labels, idx, rng, tokenizer, alphas)
        recorder.maps.clear()
        pred = unet(zt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        tokens = finding_tokens(tokenizer, captions).to(device)
        loss = F.mse_loss(pred, noise) + weight * attention_loss(recorder.maps, tokens, region_t[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    loss = stage.run(step_fn, every=100)
    unet.set_attn_processor(default_processors)
    save_unet(unet.to("cpu"), out / "unet")
    text_encoder.to("cpu").save_pretrained(out / "text_encoder")
    _save_tokenizer(out / "tokenizer")
    make_scheduler().save_pretrained(out / "scheduler")
    return loss


def train_clip(
    images: np.ndarray,
    labels: np.ndarray,
    work: Path,
    out: Path,
    recipe: StageRecipe,
    device: torch.device,
    stop: StopSwitch | None = None,
) -> float:
    torch.manual_seed(5)
    model = architecture.clip().to(device)
    tokenizer = clip_tokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-2)
    rng = np.random.default_rng(6)
    stage = Stage("clip", work, {"clip": model}, opt, recipe, rng, stop)
    mean, std = CLIP_IMAGE_MEAN[0], CLIP_IMAGE_STD[0]
    side = architecture.CLIP_IMAGE_SIZE

    def step_fn(step: int) -> float:
        idx = _batch(images, rng, recipe.batch)
        x = torch.from_numpy(images[idx]).to(device).float()[:, None] / 255.0
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True).expand(-1, 3, -1, -1)
        captions = [training_caption(_findings(labels[i]), rng) for i in idx]
        tok = tokenizer(captions, padding="max_length", max_length=TOKEN_WINDOW, return_tensors="pt").to(device)
        img = F.normalize(projected_features(model.get_image_features(pixel_values=(x - mean) / std)), dim=-1)
        txt = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        txt = F.normalize(projected_features(txt), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        lab = torch.from_numpy(labels[idx]).to(device)
        same = (lab[:, None, :] == lab[None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    loss = stage.run(step_fn)
    model.to("cpu").save_pretrained(out / "clip")
    _save_tokenizer(out / "clip")
    write_clip_preprocessor(out / "clip", side)
    return loss


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    work: Path,
    out: Path,
    recipe: StageRecipe,
    device: torch.device,
    stop: StopSwitch | None = None,
) -> float:
    torch.manual_seed(7)
    model = FindingClassifier(builtin_classifier_config()).train().requires_grad_(True).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    rng = np.random.default_rng(8)
    stage = Stage("classifier", work, {"classifier": model}, opt, recipe, rng, stop)

    def step_fn(step: int) -> float:
        idx = _batch(images, rng, recipe.batch)
        x = torch.from_numpy(images[idx]).to(device).float()[:, None] / 255.0
        loss = F.binary_cross_entropy_with_logits(model(x), torch.from_numpy(labels[idx]).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    loss = stage.run(step_fn)
    model.to("cpu").save(out / "classifier.safetensors")
    return loss


@torch.no_grad()
def measure(out: Path) -> dict[str, float]:
    """Held-out figures for the model card: VAE round-trip error and classifier accuracy."""
    images, labels = build_dataset(len(EVAL_SEEDS), seeds=EVAL_SEEDS)
    x = torch.from_numpy(images).float()[:, None] / 255.0
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    decoded = vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample
    classifier = FindingClassifier.load(out / "classifier.safetensors")
    predicted = torch.sigmoid(classifier(x)).numpy() > 0.5
    components = {
        "vae": vae,
        "unet": UNet2DConditionModel.from_pretrained(out / "unet"),
        "text_encoder": CLIPTextModel.from_pretrained(out / "text_encoder"),
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
