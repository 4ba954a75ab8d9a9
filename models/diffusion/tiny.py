"""Randomly initialised models with the SD v1.5 structure, built offline from configs.

:func:`make_tiny_model` writes a small one (64x64 pixels) in the file layout of a real Stable
Diffusion directory, for tests and development; :func:`full_size_bundle` builds SD v1.5's
full-size architecture in memory, for speed and memory benchmarks on a GPU.
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

import models.weights.offline  # noqa: F401  (before diffusers/transformers)
from models.diffusion.components import ClipParts, ModelBundle, assemble_bundle, resolve_device, write_clip_preprocessor
from models.diffusion.ddim import make_scheduler
from models.request.constants import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, SD15_LATENT_SCALE, TOKEN_WINDOW
from models.request.params import DtypeName
from models.request.tokenizer import clip_tokenizer

VOCAB_SIZE = 49408
SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
"""Stable Diffusion v1.5's UNet (860 M parameters): the rest of its config is diffusers' default."""


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


def full_size_bundle(device: str = "cuda", dtype: DtypeName | None = None, seed: int = 0) -> ModelBundle:
    """Stable Diffusion v1.5's architecture with random weights, built in memory from configs: the
    UNet (860 M parameters), the VAE at 512 px, the CLIP ViT-L/14 text encoder, and a CLIP
    ViT-L/14 scorer. For timing and memory only: its edits are noise."""
    device_t, torch_dtype = resolve_device(device, dtype)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET).to(torch_dtype)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=SD15_LATENT_SCALE,
    )
    text = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=TOKEN_WINDOW,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
    )
    scorer = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=768))
    tokenizer = clip_tokenizer()
    clip = ClipParts(scorer, tokenizer, 224, CLIP_IMAGE_MEAN, CLIP_IMAGE_STD)
    return assemble_bundle(
        unet, vae, CLIPTextModel(text), tokenizer, make_scheduler(), clip, device_t, f"sd15-random-{seed}"
    )
