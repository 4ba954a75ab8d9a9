"""Signed difference maps, computed in float (never by subtracting uint8 arrays, which wraps)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def difference(counterfactual: np.ndarray, original: np.ndarray) -> np.ndarray:
    """counterfactual - original, float32, in intensity units of [0, 1]."""
    return counterfactual.astype(np.float32) - original.astype(np.float32)


def render_difference(diff: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, float]:
    """(H, W, 3) uint8 RGB with a blue-white-red diverging map: red where the counterfactual is brighter.

    ``scale`` is the absolute difference drawn at full colour; by default the 99.5th percentile
    of |diff| so a few outliers do not wash the map out. Returns the image and the scale used.
    """
    if scale is None:
        scale = float(np.percentile(np.abs(diff), 99.5)) if diff.size else 0.0
    scale = max(scale, 1e-6)
    v = np.clip(diff / scale, -1.0, 1.0)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    rgb = np.stack([1.0 - neg, 1.0 - pos - neg, 1.0 - pos], axis=-1)
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), scale


def encode_rgb_png(rgb: np.ndarray) -> bytes:
    """A PNG of an (H, W, 3) uint8 image; no metadata is written."""
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
