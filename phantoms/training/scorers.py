"""The scorers: the CLIP model behind S_CLIP and the finding classifier of the guided method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import models.weights.offline  # noqa: F401  (before diffusers/transformers)
from models.diffusion.components import write_clip_preprocessor
from models.request.constants import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, TOKEN_WINDOW
from models.request.tokenizer import clip_tokenizer
from models.scoring.classifier import FindingClassifier, builtin_classifier_config
from models.scoring.clip import projected_features
from models.training.stopping import StopSwitch
from phantoms import architecture
from phantoms.captions import training_caption
from phantoms.recipe import StageRecipe
from phantoms.training.data import batch_indices, findings_of, save_tokenizer
from phantoms.training.stage import Stage


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
        idx = batch_indices(images, rng, recipe.batch)
        x = torch.from_numpy(images[idx]).to(device).float()[:, None] / 255.0
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True).expand(-1, 3, -1, -1)
        captions = [training_caption(findings_of(labels[i]), rng) for i in idx]
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
    save_tokenizer(out / "clip")
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
        idx = batch_indices(images, rng, recipe.batch)
        x = torch.from_numpy(images[idx]).to(device).float()[:, None] / 255.0
        loss = F.binary_cross_entropy_with_logits(model(x), torch.from_numpy(labels[idx]).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    loss = stage.run(step_fn)
    model.to("cpu").save(out / "classifier.safetensors")
    return loss
