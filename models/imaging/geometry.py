"""Image decoding and the mapping between input geometry and the model's square resolution.

Chest X-rays are often portrait: instead of centre-cropping (which cuts anatomy off), the image
is padded to a square with black, resized to the model size, and outputs are mapped back by
the inverse resize and crop, so every output has the input's exact size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from models.imaging.dicom import DicomSource, is_dicom, read_dicom
from models.request.errors import ImageError, InvalidInput
from models.request.report import Geometry, InputFormat


@dataclass(frozen=True)
class DecodedImage:
    """Grayscale intensities in [0, 1] (float32, H x W), the bit depth of the PNG outputs and, for a
    DICOM input, what the DICOM outputs copy from it."""

    pixels: np.ndarray
    bit_depth: int
    dicom: DicomSource | None = None

    @property
    def format(self) -> InputFormat:
        return "dicom" if self.dicom is not None else "image"


def decode_image(data: bytes, max_pixels: int = 2**31) -> DecodedImage:
    """Decode a DICOM (see :mod:`models.imaging.dicom`), PNG or JPEG (8- or 16-bit grayscale, RGB, RGBA)
    into grayscale intensities."""
    if is_dicom(data):
        pixels, source = read_dicom(data, max_pixels)
        return DecodedImage(pixels, 8 if source.bits_stored <= 8 else 16, source)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise ImageError(f"unsupported image format {img.format!r}; use PNG, JPEG or DICOM", "unsupported")
            img = ImageOps.exif_transpose(img)
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not a PNG, JPEG or DICOM Part 10 file", "unsupported") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from exc
    return to_grayscale(img)


def read_image_file(path: Path, field: str, max_pixels: int = 2**31) -> DecodedImage:
    """:func:`decode_image` of a file. A missing, unreadable or undecodable file is InvalidInput
    naming ``field`` (the option or column it came from) and the path, so that a command reading
    many files, or two at once (an image and its mask), says which one failed."""
    try:
        return decode_image(path.read_bytes(), max_pixels)
    except ImageError as exc:
        raise InvalidInput(field, f"{path}: {exc}") from exc
    except OSError as exc:
        raise InvalidInput(field, f"{path}: {exc.strerror or exc}") from exc


def keep_mask(image: DecodedImage) -> np.ndarray:
    """An anatomy mask image as booleans: True (keep) wherever it is not black."""
    return image.pixels > 0


def to_grayscale(img: Image.Image) -> DecodedImage:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        return DecodedImage((np.clip(arr, 0, 65535) / 65535.0).astype(np.float32), 16)
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    if img.mode == "RGB":
        arr = np.asarray(img, dtype=np.float32) / 255.0
        gray = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return DecodedImage(gray.astype(np.float32), 8)
    if img.mode in ("L", "1"):
        return DecodedImage(np.asarray(img.convert("L"), dtype=np.float32) / 255.0, 8)
    raise ImageError(f"unsupported image mode {img.mode!r}")


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


def encode_png(pixels: np.ndarray, bit_depth: int) -> bytes:
    """Grayscale PNG of intensities in [0, 1], 8- or 16-bit; no metadata is written."""
    if bit_depth == 16:
        img = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 65535).astype(np.uint16))
    else:
        img = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
