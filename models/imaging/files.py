"""Image files in and out: PNG, JPEG and DICOM decoded to grey intensities, PNGs written. Torch-free:
the API checks uploads with it.

PRISM edits greyscale radiographs, and one rule holds for every format: an image stored in colour
(RGB, RGBA, palette, YCbCr JPEG, colour DICOM) is accepted when it is grey, that is when no pixel's
channels differ by more than :data:`~models.imaging.colour.GREY_TOLERANCE` (JPEG's chroma
rounding stays within it), and it is then read as grey; the result says so (``input_colour``).
An image with real colour (annotations, a heat map, a photograph) is refused rather than silently
turned grey. An anatomy mask is not an X-ray: it may be drawn in any colour (``accept_colour``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.imaging.colour import grey_of
from models.imaging.dicom import DicomSource, is_dicom, read_dicom
from models.request.errors import ImageError, InvalidInput
from models.request.report import InputFormat


@dataclass(frozen=True)
class DecodedImage:
    """Grayscale intensities in [0, 1] (float32, H x W), the bit depth of the PNG outputs, the
    colour storage it was read from (None for a greyscale file) and, for a DICOM input, what the
    DICOM outputs copy from it."""

    pixels: np.ndarray
    bit_depth: int
    dicom: DicomSource | None = None
    colour: str | None = None

    @property
    def format(self) -> InputFormat:
        return "dicom" if self.dicom is not None else "image"


def decode_image(data: bytes, max_pixels: int = 2**31, accept_colour: bool = False) -> DecodedImage:
    """Decode a DICOM (see :mod:`models.imaging.dicom`), PNG or JPEG (8- or 16-bit grey, or grey
    stored in colour) into grey intensities."""
    if is_dicom(data):
        pixels, source = read_dicom(data, max_pixels)
        return DecodedImage(pixels, 8 if source.bits_stored <= 8 else 16, source, source.colour)
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
        raise ImageError("the image cannot be decoded (truncated or corrupt)") from exc
    return to_grayscale(img, accept_colour)


def to_grayscale(img: Image.Image, accept_colour: bool = False) -> DecodedImage:
    """A decoded Pillow image as grey intensities, by the module's colour rule; transparency is
    composited over black (the background of a radiograph)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        return DecodedImage((np.clip(arr, 0, 65535) / 65535.0).astype(np.float32), 16)
    if img.mode in ("L", "1"):
        return DecodedImage(np.asarray(img.convert("L"), dtype=np.float32) / 255.0, 8)
    stored_as = img.mode
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    if img.mode != "RGB":
        raise ImageError(f"unsupported image mode {img.mode!r}", "unsupported")
    if stored_as == "LA":
        return DecodedImage(np.asarray(img.convert("L"), dtype=np.float32) / 255.0, 8)
    grey = grey_of(np.asarray(img, dtype=np.float32) / 255.0, stored_as, accept_colour)
    return DecodedImage(grey, 8, colour=stored_as)


def read_image_file(path: Path, field: str, max_pixels: int = 2**31, accept_colour: bool = False) -> DecodedImage:
    """:func:`decode_image` of a file. A missing, unreadable or undecodable file is InvalidInput
    naming ``field`` (the option or column it came from) and the path, so that a command reading
    many files, or two at once (an image and its mask), says which one failed."""
    try:
        return decode_image(path.read_bytes(), max_pixels, accept_colour)
    except ImageError as exc:
        raise InvalidInput(field, f"{path}: {exc}") from exc
    except OSError as exc:
        raise InvalidInput(field, f"{path}: {exc.strerror or exc}") from exc


def keep_mask(image: DecodedImage) -> np.ndarray:
    """An anatomy mask image as booleans: True (keep) wherever it is not black."""
    return image.pixels > 0


def encode_png(pixels: np.ndarray, bit_depth: int) -> bytes:
    """Grayscale PNG of intensities in [0, 1], 8- or 16-bit; no metadata is written."""
    if bit_depth == 16:
        img = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 65535).astype(np.uint16))
    else:
        img = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
