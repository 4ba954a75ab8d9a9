"""Train the built-in model on phantoms: VAE, text-conditioned UNet, CLIP scorer, classifier.

Seeded and resumable: each stage checkpoints to ``work`` and is skipped once its outputs exist,
so ``prism train-builtin`` can be interrupted and run again. Runs on CPU in about 2.5 hours
(2 cores); the outputs have the diffusers/transformers layout that ``load_bundle`` reads.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel

import models.hf_offline  # noqa: F401  (before diffusers/transformers)
from models.attention_control import ControlledAttnProcessor
from models.ddim import make_scheduler
from models.scoring import projected_features
from models.tiny import clip_text_config, small_clip_config
from models.tokenizer import ASSETS, clip_tokenizer
from models.words import prompt_words, word_token_indices
from phantoms.captions import NAMES, training_caption
from phantoms.classifier import FindingClassifier
from phantoms.render import FINDINGS, Anatomy, Findings, region_mask, render

log = logging.getLogger("prism.train")
SIZE = 128
TRAIN_SEEDS = range(0, 16000)
TEXT_HIDDEN = 64


def build_dataset(n: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, size, size) uint8 and findings (n, 3) for training seeds 0..n-1."""
    images = np.empty((n, size, size), np.uint8)
    labels = np.empty((n, len(FINDINGS)), np.float32)
    for i in range(n):
        rng = np.random.default_rng(10_000_000 + i)
        findings = Findings(*(bool(v) for v in rng.random(3) < 0.5))
        images[i] = np.round(render(Anatomy.sample(i, size), findings) * 255)
        labels[i] = findings.as_vector()
    return images, labels


def build_regions(n: int, size: int = SIZE, side: int = 16) -> np.ndarray:
    """Area fraction (n, 3, side, side) of each finding's region for training seeds 0..n-1."""
    regions = np.empty((n, len(FINDINGS), side, side), np.float16)
    for i in range(n):
        anatomy = Anatomy.sample(i, size)
        for f, name in enumerate(FINDINGS):
            mask = region_mask(anatomy, name).astype(np.float32)
            regions[i, f] = mask.reshape(side, size // side, side, size // side).mean((1, 3))
    return regions


def _findings(row: np.ndarray) -> Findings:
    return Findings(*(bool(v) for v in row))


class Stage:
    """A resumable training loop: ``step_fn(step)`` returns the loss; checkpoints every ``every``."""

    def __init__(self, name: str, work: Path, modules: dict[str, torch.nn.Module], optimizer, steps: int) -> None:
        self.name, self.modules, self.optimizer, self.steps = name, modules, optimizer, steps
        self.path = work / f"{name}.ckpt"
        self.start = 0
        if self.path.exists():
            state = torch.load(self.path, weights_only=True)
            for key, module in modules.items():
                module.load_state_dict(state[key])
            optimizer.load_state_dict(state["optimizer"])
            self.start = state["step"]
            log.info("%s: resuming at step %d", name, self.start)

    def run(self, step_fn: Callable[[int], float], lr: float, every: int = 200) -> None:
        smoothed = None
        t0 = time.perf_counter()
        for step in range(self.start, self.steps):
            warm = min(1.0, (step + 1) / 100)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / self.steps)))
            loss = step_fn(step)
            smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
            if (step + 1) % every == 0 or step + 1 == self.steps:
                state = {k: m.state_dict() for k, m in self.modules.items()}
                torch.save({**state, "optimizer": self.optimizer.state_dict(), "step": step + 1}, self.path)
                rate = (time.perf_counter() - t0) / (step + 1 - self.start)
                log.info("%s: step %d/%d loss %.5f (%.2f s/step)", self.name, step + 1, self.steps, smoothed, rate)


def train_vae(images: np.ndarray, work: Path, out: Path, steps: int = 1000) -> AutoencoderKL:
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    stage = Stage("vae", work, {"vae": vae}, opt, steps)
    rng = np.random.default_rng(2)

    def step_fn(step: int) -> float:
        idx = rng.integers(0, len(images), 32)
        y0, x0 = rng.integers(0, SIZE - 64, 2)
        x = torch.from_numpy(images[idx, y0 : y0 + 64, x0 : x0 + 64]).float()[:, None] / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(rec, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    stage.run(step_fn, lr=1e-3)
    vae.eval()
    with torch.no_grad():
        x = torch.from_numpy(images[:256]).float()[:, None] / 127.5 - 1
        std = torch.cat([vae.encode(b).latent_dist.mean for b in x.split(64)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out / "vae")
    return vae


def encode_all(vae: AutoencoderKL, images: np.ndarray) -> torch.Tensor:
    scale = vae.config.scaling_factor
    with torch.no_grad():
        chunks = []
        for i in range(0, len(images), 128):
            x = torch.from_numpy(images[i : i + 128]).float()[:, None] / 127.5 - 1
            chunks.append(vae.encode(x).latent_dist.mean * scale)
    return torch.cat(chunks)


def _save_tokenizer(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS / name, directory / name)


def _noised_batch(
    latents: torch.Tensor, labels: np.ndarray, idx: np.ndarray, rng: np.random.Generator, tokenizer, alphas
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(noisy latents, timesteps, noise, caption token ids, captions) for training rows ``idx``.

    10 % of captions are empty, for classifier-free guidance.
    """
    z0 = latents[idx]
    captions = ["" if rng.random() < 0.1 else training_caption(_findings(labels[i]), rng) for i in idx]
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    t = torch.from_numpy(rng.integers(0, 1000, len(idx)))
    noise = torch.randn_like(z0)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, noise, ids, captions


def train_unet(latents: torch.Tensor, labels: np.ndarray, work: Path, out: Path, steps: int = 3000) -> None:
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=latents.shape[-1],
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(clip_text_config(TEXT_HIDDEN))
    tokenizer = clip_tokenizer()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-2)
    stage = Stage("unet", work, {"unet": unet, "text_encoder": text_encoder}, opt, steps)
    rng = np.random.default_rng(4)
    alphas = make_scheduler().alphas_cumprod

    def step_fn(step: int) -> float:
        zt, t, noise, ids, _ = _noised_batch(latents, labels, rng.integers(0, len(latents), 24), rng, tokenizer, alphas)
        pred = unet(zt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    stage.run(step_fn, lr=3e-4, every=250)
    unet.save_pretrained(out / "unet")
    text_encoder.save_pretrained(out / "text_encoder")
    _save_tokenizer(out / "tokenizer")
    make_scheduler().save_pretrained(out / "scheduler")


class _CrossAttentionRecorder:
    """Keeps every cross-attention layer's head-averaged probabilities, with their gradients."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def __call__(self, probs: torch.Tensor, is_cross: bool, batch: int) -> torch.Tensor:
        if is_cross:
            self.maps.append(probs.view(batch, -1, *probs.shape[1:]).mean(1))
        return probs


def _finding_tokens(tokenizer, caption: str) -> list[tuple[int, list[int]]]:
    """(finding index, token positions) for each finding the caption names, with or without."""
    words = set(prompt_words(caption))
    named = []
    for f, name in enumerate(FINDINGS):
        finding_words = prompt_words(NAMES[name])
        if all(w in words for w in finding_words):
            named.append((f, word_token_indices(tokenizer, caption, finding_words, "caption")))
    return named


def attention_loss(maps: list[torch.Tensor], named: list[list[tuple[int, list[int]]]], regions: torch.Tensor):
    """Cross-entropy of each named finding's region under its words' attention over the map.

    ``regions`` (B, 3, s, s) holds area fractions, pooled to each map's size and normalised to a
    distribution. The loss is lowest when a finding's words attend evenly over its whole region and
    nowhere else, as a large model learns from data; LocalBlend's masks then cover the finding.
    """
    terms = []
    for m in maps:
        side = int(round(m.shape[1] ** 0.5))
        target = F.adaptive_avg_pool2d(regions, side).flatten(2).to(m.dtype)
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-6)
        for b, pairs in enumerate(named):
            for f, tokens in pairs:
                a = m[b, :, tokens].sum(-1)
                terms.append(-(target[b, f] * torch.log(a / a.sum() + 1e-8)).sum())
    return torch.stack(terms).mean() if terms else maps[0].sum() * 0


def train_attention(
    latents: torch.Tensor, labels: np.ndarray, regions: np.ndarray, work: Path, out: Path, steps: int = 1000
) -> None:
    """Fine-tune the UNet and text encoder with ε-MSE plus ``0.02 * attention_loss``."""
    torch.manual_seed(9)
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder")
    recorder = _CrossAttentionRecorder()
    default_processors = unet.attn_processors
    unet.set_attn_processor(ControlledAttnProcessor(recorder))
    tokenizer = clip_tokenizer()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    stage = Stage("attention", work, {"unet": unet, "text_encoder": text_encoder}, opt, steps)
    rng = np.random.default_rng(10)
    alphas = make_scheduler().alphas_cumprod
    region_t = torch.from_numpy(regions).float()

    def step_fn(step: int) -> float:
        idx = rng.integers(0, len(regions), 24)
        zt, t, noise, ids, captions = _noised_batch(latents, labels, idx, rng, tokenizer, alphas)
        recorder.maps.clear()
        pred = unet(zt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        named = [_finding_tokens(tokenizer, c) for c in captions]
        loss = F.mse_loss(pred, noise) + 0.02 * attention_loss(recorder.maps, named, region_t[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    stage.run(step_fn, lr=1e-4, every=100)
    unet.set_attn_processor(default_processors)
    unet.save_pretrained(out / "unet")
    text_encoder.save_pretrained(out / "text_encoder")


def train_clip(images: np.ndarray, labels: np.ndarray, work: Path, out: Path, steps: int = 1500) -> None:
    torch.manual_seed(5)
    hidden = 32
    config = small_clip_config(hidden, image_size=64)
    model = CLIPModel(config)
    tokenizer = clip_tokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-2)
    stage = Stage("clip", work, {"clip": model}, opt, steps)
    rng = np.random.default_rng(6)
    mean, std = 0.48145466, 0.26862954

    def step_fn(step: int) -> float:
        idx = rng.integers(0, len(images), 64)
        x = torch.from_numpy(images[idx]).float()[:, None] / 255.0
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True).expand(-1, 3, -1, -1)
        captions = [training_caption(_findings(labels[i]), rng) for i in idx]
        tok = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt")
        img = F.normalize(projected_features(model.get_image_features(pixel_values=(x - mean) / std)), dim=-1)
        txt = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        txt = F.normalize(projected_features(txt), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        lab = torch.from_numpy(labels[idx])
        same = (lab[:, None, :] == lab[None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    stage.run(step_fn, lr=5e-4)
    model.save_pretrained(out / "clip")
    _save_tokenizer(out / "clip")
    (out / "clip" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": 64},
                "crop_size": {"height": 64, "width": 64},
                "image_mean": [mean, 0.4578275, 0.40821073],
                "image_std": [std, 0.26130258, 0.27577711],
            },
            indent=2,
        )
    )


def train_classifier(images: np.ndarray, labels: np.ndarray, work: Path, out: Path, steps: int = 1000) -> None:
    torch.manual_seed(7)
    model = FindingClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    stage = Stage("classifier", work, {"classifier": model}, opt, steps)
    rng = np.random.default_rng(8)

    def step_fn(step: int) -> float:
        idx = rng.integers(0, len(images), 64)
        x = torch.from_numpy(images[idx]).float()[:, None] / 255.0
        loss = F.binary_cross_entropy_with_logits(model(x), torch.from_numpy(labels[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    stage.run(step_fn, lr=2e-3)
    model.save(out / "classifier.safetensors")


def train_builtin(work: Path, out: Path, n_images: int = len(TRAIN_SEEDS), scale: float = 1.0) -> None:
    """Run every stage not yet done; ``scale`` shrinks step counts (for quick checks)."""
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}

    def timed(name: str, fn: Callable[[], object]):
        start = time.perf_counter()
        result = fn()
        times[name] = round(times.get(name, 0.0) + time.perf_counter() - start, 1)
        times_path.write_text(json.dumps(times, indent=2))
        return result

    data = work / "data.npz"
    if not data.exists():
        images, labels = timed("data", lambda: build_dataset(n_images))
        np.savez(data, images=images, labels=labels)
    loaded = np.load(data)
    images, labels = loaded["images"], loaded["labels"]
    steps = lambda n: max(10, int(n * scale))  # noqa: E731

    if (out / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(out / "vae")
    else:
        vae = timed("vae", lambda: train_vae(images, work, out, steps(1000)))
    latents_path = work / "latents.pt"
    if not latents_path.exists():
        torch.save(timed("latents", lambda: encode_all(vae.eval(), images)), latents_path)
    latents = torch.load(latents_path, weights_only=True)
    if not (out / "unet" / "config.json").exists():
        timed("unet", lambda: train_unet(latents, labels, work, out, steps(1800)))
    if not (work / "attention.done").exists():
        regions_path = work / "regions.npy"
        if not regions_path.exists():
            np.save(regions_path, timed("regions", lambda: build_regions(min(6000, len(images)))))
        regions = np.load(regions_path)
        timed("attention", lambda: train_attention(latents, labels, regions, work, out, steps(2500)))
        (work / "attention.done").touch()
    if not (out / "clip" / "config.json").exists():
        timed("clip", lambda: train_clip(images, labels, work, out, steps(900)))
    if not (out / "classifier.safetensors").exists():
        timed("classifier", lambda: train_classifier(images, labels, work, out, steps(600)))
    (out / "training_times.json").write_text(json.dumps(times, indent=2))
