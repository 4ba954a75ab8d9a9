"""The colour rule every input format follows: PRISM edits greyscale radiographs, so an image stored
in colour is read as grey only when it is grey (see :mod:`models.imaging.files`)."""

from __future__ import annotations

import numpy as np

from models.request.errors import ImageError

GREY_TOLERANCE = 4 / 255
"""Largest difference between a pixel's colour channels (fraction of full scale) in a grey image;
JPEG's chroma rounding of a grey image stays within it."""
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


def grey_of(rgb: np.ndarray, stored_as: str, accept_colour: bool = False) -> np.ndarray:
    """The luma (H, W) of an (H, W, 3) image in [0, 1]. ImageError when its channels differ by more
    than :data:`GREY_TOLERANCE`, unless ``accept_colour``."""
    spread = float((rgb.max(axis=2) - rgb.min(axis=2)).max(initial=0.0))
    if spread > GREY_TOLERANCE and not accept_colour:
        within = round(GREY_TOLERANCE * 255)
        raise ImageError(
            f"a colour image ({stored_as}; its channels differ by up to {round(spread * 255)}/255) is not accepted: "
            f"PRISM edits greyscale X-rays (grey stored in colour, channels within {within}/255, is)"
        )
    return (rgb @ LUMA).astype(np.float32)
