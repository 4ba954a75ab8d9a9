"""The attention stage: the UNet and text encoder fine-tuned so that each finding's words attend
over its region, which LocalBlend's masks then cover."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import models.weights.offline  # noqa: F401  (before diffusers/transformers)
from models.diffusion.attention_control import ControlledAttnProcessor
from models.diffusion.components import embed_prompts, load_parts
from models.diffusion.ddim import make_scheduler
from models.request.constants import TOKEN_WINDOW
from models.request.tokenizer import clip_tokenizer
from models.request.words import prompt_words, word_token_indices
from models.training.finetune import save_unet
from models.training.stopping import StopSwitch
from phantoms.captions import NAMES
from phantoms.recipe import StageRecipe
from phantoms.render import FINDINGS
from phantoms.training.data import batch_indices, save_tokenizer
from phantoms.training.diffusion import noised_batch
from phantoms.training.stage import Stage


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
    parts = load_parts(model)
    unet, text_encoder = parts.unet.to(device), parts.text_encoder.to(device)
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
        idx = batch_indices(regions, rng, recipe.batch)
        zt, t, noise, captions = noised_batch(latents, labels, idx, rng, alphas)
        recorder.maps.clear()
        pred = unet(zt, t, encoder_hidden_states=embed_prompts(text_encoder, tokenizer, captions)).sample
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
    save_tokenizer(out / "tokenizer")
    make_scheduler().save_pretrained(out / "scheduler")
    return loss
