"""Checks of uploaded images in the API process (Pillow only, no torch).

The content decides the format, not the client's filename or Content-Type: only PNG and
JPEG are opened, the pixel count is capped before decoding, and a truncated file is rejected.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


@dataclass
class UploadRejected(Exception):
    status_code: int
    message: str


def check_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Return (width, height) of a decodable single-frame PNG/JPEG, else raise UploadRejected."""
    if not data:
        raise UploadRejected(422, "the file is empty")
    kind = next((name for sig, name in SIGNATURES.items() if data.startswith(sig)), None)
    if kind is None:
        raise UploadRejected(415, "not a PNG or JPEG image (detected from the file content)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[kind]) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise UploadRejected(413, f"image has {width * height} pixels; the limit is {max_pixels}")
                if getattr(img, "n_frames", 1) > 1:
                    raise UploadRejected(422, "animated or multi-frame images are not accepted")
                img.load()
    except UploadRejected:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise UploadRejected(413, f"image is too large to decode safely: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise UploadRejected(422, f"the {kind} file cannot be decoded (truncated or corrupt)") from exc
    return width, height
