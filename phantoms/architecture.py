"""The built-in model's components: an SD v1.5-structured latent diffusion model at 128 px, grayscale.

Declared here, once, for training; ``models/assets/builtin/*/config.json`` are what these write.
(The random test models of ``models.diffusion.tiny`` have their own, smaller configs.)
"""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionConfig

import models.weights.offline  # noqa: F401  (before diffusers/transformers)
from models.diffusion.attention_control import BlendMaps
from models.diffusion.tiny import clip_text_config

SIZE = 128
"""Phantom side in pixels; the latent is SIZE / 4 = 32."""
LATENT_SIZE = SIZE // 4
TEXT_HIDDEN = 64
CLIP_HIDDEN = 32
CLIP_IMAGE_SIZE = 64
BLEND_MAPS = BlendMaps(side=16, dilation=0, word_thresholds={"pleural": 0.6, "effusion": 0.6, "cardiomegaly": 0.6})
"""LocalBlend uses the 16x16 cross-attention maps, unpooled (``local_blend.json``): P2P's choice
(a quarter of the latent side, pooled over one cell) grows every cell a thin wire touches to 48 px.
Effusion and cardiomegaly, large regions whose attention spreads past them, are cut at 0.6; the
devices' thin wires keep P2P's 0.3, as a higher cut loses their flips (chosen on the validation phantoms:
docs/bench/threshold-sweep.md)."""


def vae() -> AutoencoderKL:
    """1 channel in and out, 4x down to 4 latent channels, no mid-block attention."""
    return AutoencoderKL(
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


def unet() -> UNet2DConditionModel:
    """Latent 32x32; cross-attention at the 16x16 and 8x8 resolutions."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
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


def text_encoder() -> CLIPTextModel:
    return CLIPTextModel(clip_text_config(TEXT_HIDDEN))


def clip() -> CLIPModel:
    """The S_CLIP scorer: 2-layer towers, vision on 64 px in patches of 8."""
    vision = CLIPVisionConfig(
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=8,
        projection_dim=CLIP_HIDDEN,
    )
    config = CLIPConfig(
        text_config=clip_text_config(CLIP_HIDDEN).to_dict(), vision_config=vision.to_dict(), projection_dim=CLIP_HIDDEN
    )
    return CLIPModel(config)
