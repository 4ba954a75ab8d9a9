"""The mapping between an input's geometry and the model's square resolution.

Chest X-rays are often portrait: instead of centre-cropping (which cuts anatomy off), the image
is padded to a square with black, resized to the model size, and outputs are mapped back by
the inverse resize and crop, so every output has the input's exact size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.request.report import Geometry


def to_model_input(pixels: np.ndarray, model_size: int) -> tuple[torch.Tensor, Geometry]:
    """Pad to a centred square and resize: returns (1, 1, S, S) float32 in [0, 1] and the geometry."""
    h, w = pixels.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.zeros((side, side), dtype=np.float32)
    square[top : top + h, left : left + w] = pixels
    t = torch.from_numpy(square)[None, None]
    if side != model_size:
        t = F.interpolate(t, size=(model_size, model_size), mode="bicubic", antialias=True, align_corners=False)
    return t.clamp(0, 1), Geometry(height=h, width=w, side=side, top=top, left=left, model_size=model_size)


def from_model_output(image: torch.Tensor, geometry: Geometry) -> np.ndarray:
    """Map a (S, S) model-size image in [0, 1] back to the input's height and width."""
    t = image.detach().float().cpu()[None, None]
    if geometry.side != geometry.model_size:
        t = F.interpolate(t, size=(geometry.side, geometry.side), mode="bicubic", antialias=True, align_corners=False)
    t = t[0, 0, geometry.top : geometry.top + geometry.height, geometry.left : geometry.left + geometry.width]
    return t.clamp(0, 1).numpy().astype(np.float32)


def quantize(pixels: np.ndarray, bit_depth: int) -> np.ndarray:
    """Round intensities to the output bit depth and return them as floats in [0, 1]."""
    peak = 65535.0 if bit_depth == 16 else 255.0
    return (np.round(np.clip(pixels, 0, 1) * peak) / peak).astype(np.float32)
