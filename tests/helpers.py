"""Helpers shared by the tests: test images and the prompts most tests use."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from PIL import Image

SOURCE = "chest x-ray of a patient with support devices"
EDIT = "chest x-ray of a patient without support devices"


def fuzz(examples: int) -> settings:
    """Hypothesis settings for a fuzz target in the suite: seeded (the same examples every run, none
    kept between runs) and bounded, so the suite's time does not grow with it."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


def xray_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth grayscale test image in [0, 1] with structure the VAE can represent."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    img = 0.5 + 0.25 * np.sin(6 * xx + rng.uniform(0, 3)) * np.cos(4 * yy) + 0.05 * rng.standard_normal((height, width))
    return np.clip(img, 0, 1).astype(np.float32)


def png_bytes(pixels: np.ndarray, bit_depth: int = 8, **save) -> bytes:
    """A grayscale PNG of intensities in [0, 1]."""
    if bit_depth == 16:
        img = Image.fromarray(np.round(pixels * 65535).astype(np.uint16))
    else:
        img = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def write_png(path: Path, pixels: np.ndarray, bit_depth: int = 8) -> Path:
    path.write_bytes(png_bytes(pixels, bit_depth))
    return path


def phantom_batch(n: int, dicom_every: int = 0, folder: str = "scans") -> tuple[bytes, bytes, list[dict]]:
    """A ZIP of ``n`` training phantoms (every ``dicom_every``-th as DICOM), its CheXpert manifest
    and the manifest's rows (:func:`phantoms.example.phantom_batch`)."""
    from phantoms.example import phantom_batch as make

    return make(n, dicom_every, folder)
