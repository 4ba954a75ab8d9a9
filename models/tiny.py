"""Build a small, randomly initialised model with the SD v1.5 structure, entirely offline.

Used by tests and for development: same components and file layout as a real Stable
Diffusion directory (loadable by :func:`models.loading.load_bundle`), at 64x64 pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
)

import models.hf_offline  # noqa: F401  (before diffusers/transformers)
from models.constants import SD15_LATENT_SCALE, TOKEN_WINDOW
from models.ddim import make_scheduler
from models.loading import write_clip_preprocessor
from models.tokenizer import clip_tokenizer

VOCAB_SIZE = 49408


def clip_text_config(hidden: int) -> CLIPTextConfig:
    """A 2-layer CLIP text transformer of width ``hidden`` over the real 49,408-token vocabulary."""
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKEN_WINDOW,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def small_clip_config(hidden: int, image_size: int, patch_size: int = 8) -> CLIPConfig:
    """A small CLIPModel (2-layer towers of width ``hidden``) for S_CLIP scoring."""
    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )
    text = clip_text_config(hidden).to_dict()
    return CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=hidden)


def make_tiny_model(directory: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny SD-structured model and a tiny CLIP scorer to ``directory``.

    ``sample_size`` is the latent side; the pixel resolution is 8x that (64 by default).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    hidden = 32
    UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=8,
        norm_num_groups=8,
    ).save_pretrained(out / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 8,
        scaling_factor=SD15_LATENT_SCALE,
    ).save_pretrained(out / "vae")
    CLIPTextModel(clip_text_config(hidden)).save_pretrained(out / "text_encoder")
    tokenizer = clip_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    make_scheduler().save_pretrained(out / "scheduler")

    clip_dir = out / "clip"
    config = small_clip_config(hidden, image_size=32)
    CLIPModel(config).save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    write_clip_preprocessor(clip_dir, image_size=32)
    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "prism_note": "tiny random-weight model for tests; not for clinical use",
            },
            indent=2,
        )
    )
    return out
