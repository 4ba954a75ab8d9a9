"""Checks of uploaded images in the API process (Pillow and pydicom, no torch).

The content decides the format, not the client's filename or Content-Type: only PNG, JPEG and
DICOM Part 10 files are opened, the pixel count is capped before decoding, and a truncated file
is rejected. A DICOM file is decoded here in full (:func:`models.imaging.dicom.read_dicom`), so a file
the worker could not read is refused with a 4xx naming why, before anything is enqueued.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

from models.imaging.dicom import is_dicom, read_dicom
from models.imaging.files import to_grayscale
from models.request.errors import ImageError, InvalidInput
from models.request.params import DICOM_FILES
from service.contract.jobs import JobRequest
from service.contract.pacs import endpoint

SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
STATUS = {"invalid": 422, "unsupported": 415, "too_large": 413}


@dataclass
class UploadRejected(Exception):
    """The ``image`` field is unusable: 413, 415 or 422 with a message naming why."""

    status_code: int
    message: str
    kind: str = "invalid_image"
    field: str = "image"


@dataclass(frozen=True)
class Upload:
    """An uploaded image's bytes, checked to decode, and its (width, height)."""

    data: bytes
    size: tuple[int, int]


def read_upload(file: BinaryIO, max_bytes: int, max_pixels: int) -> Upload:
    """The uploaded image, decoded once to check it is a usable image within the limits."""
    data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UploadRejected(413, f"file exceeds {max_bytes} bytes", "too_large")
    return Upload(data, check_image(data, max_pixels))


def read_reference(request: JobRequest, pacs_file: str | None, max_pixels: int) -> Upload:
    """The radiograph a request names by reference (``source`` and ``study_uid``), retrieved from
    the PACS and checked as an upload is (the same decoding, refusals and colour rule)."""
    pacs = endpoint(pacs_file, request.source, "source")
    data = pacs.retrieve(pacs.frontal(request.study_uid, request.series_uid, request.sop_uid))
    return Upload(data, check_image(data, max_pixels))


NOT_DICOM = "needs a DICOM input: only those have DICOM outputs to store"
"""Why a ``store_to`` is refused for a PNG or JPEG input (a single one, or a batch's row)."""


def check_store_to(store_to: str | None, outputs: tuple[str, ...], pacs_file: str | None) -> None:
    """A ``store_to`` names an endpoint of the service's and ``outputs`` hold a DICOM file to store
    (whether the input is DICOM is checked where it is read: :data:`NOT_DICOM`); else an
    :class:`InvalidInput` naming it."""
    if store_to is None:
        return
    endpoint(pacs_file, store_to, "store_to")
    if not set(DICOM_FILES) & set(outputs):
        raise InvalidInput("store_to", f"outputs holds none of {', '.join(DICOM_FILES)} to store")


def read_mask(file: BinaryIO, image_size: tuple[int, int], settings) -> bytes:
    """An anatomy mask: a PNG or JPEG of the image's ``image_size``; 422 naming ``mask`` otherwise."""
    data = file.read(settings.max_upload_bytes + 1)
    try:
        if is_dicom(data):
            raise UploadRejected(415, "a mask is a PNG or JPEG image")
        mask_size = check_image(data, settings.max_image_pixels, accept_colour=True)
    except UploadRejected as exc:
        raise UploadRejected(exc.status_code, exc.message, exc.kind, field="mask") from exc
    if mask_size != image_size:
        raise UploadRejected(422, "the mask must be the size of the image", field="mask")
    return data


def dicom_preview(data: bytes, max_pixels: int) -> bytes:
    """An 8-bit PNG of a DICOM image as the model sees it (browsers show PNG and JPEG themselves)."""
    if not is_dicom(data):
        raise UploadRejected(415, "not a DICOM file (detected from the file content)")
    try:
        pixels, _ = read_dicom(data, max_pixels)
    except ImageError as exc:
        raise UploadRejected(STATUS[exc.kind], exc.message) from exc
    buffer = io.BytesIO()
    Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def check_image(data: bytes, max_pixels: int, accept_colour: bool = False) -> tuple[int, int]:
    """Return (width, height) of a decodable single-frame PNG, JPEG or DICOM image that follows the
    colour rule (:mod:`models.imaging.files`; a mask may have any colour), else raise UploadRejected."""
    if not data:
        raise UploadRejected(422, "the file is empty")
    if is_dicom(data):
        try:
            pixels, _ = read_dicom(data, max_pixels)
        except ImageError as exc:
            raise UploadRejected(STATUS[exc.kind], exc.message) from exc
        return pixels.shape[1], pixels.shape[0]
    kind = next((name for sig, name in SIGNATURES.items() if data.startswith(sig)), None)
    if kind is None:
        raise UploadRejected(415, "not a PNG, JPEG or DICOM image (detected from the file content)")
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
                to_grayscale(img, accept_colour)
    except UploadRejected:
        raise
    except ImageError as exc:
        raise UploadRejected(STATUS[exc.kind], exc.message) from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        # Pillow's own guard, met while opening, before the size check above
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS)
        raise UploadRejected(413, f"image has more than {limit} pixels, the limit", "too_large") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise UploadRejected(422, f"the {kind} file cannot be decoded (truncated or corrupt)") from exc
    return width, height
