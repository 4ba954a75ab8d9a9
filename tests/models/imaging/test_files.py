"""Image files: PNG and JPEG decoded by the colour rule, DICOM dispatched, PNG written back."""

import io

import numpy as np
import pytest
from PIL import Image

from models.imaging.files import decode_image, encode_png, keep_mask, read_image_file
from models.imaging.geometry import quantize
from models.request.errors import ImageError, InvalidInput


def _png(image: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def _grey() -> np.ndarray:
    return (np.arange(24 * 32).reshape(24, 32) % 251).astype(np.uint8)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_decode_16bit_grayscale():
    arr16 = (np.arange(64 * 32).reshape(64, 32) * 31).astype(np.uint16)
    dec = decode_image(_png(arr16))
    assert dec.bit_depth == 16 and dec.pixels.shape == (64, 32)
    assert np.allclose(dec.pixels, arr16 / 65535.0, atol=1e-7)
    assert dec.colour is None


def test_decode_rejects_other_formats():
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="BMP")
    with pytest.raises(ImageError, match="BMP"):
        decode_image(buf.getvalue())
    with pytest.raises(ImageError):
        decode_image(b"not an image")


def test_an_image_file_is_decoded_and_a_bad_one_named_by_field_and_path(tmp_path):
    pixels = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    (tmp_path / "mask.png").write_bytes(encode_png(pixels, 16))
    decoded = read_image_file(tmp_path / "mask.png", "--mask")
    np.testing.assert_allclose(decoded.pixels, pixels, atol=1 / 65535)
    assert keep_mask(decoded).tolist() == [[False, True], [True, True]]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InvalidInput, match=f"^--mask: {tmp_path}/bad.png: not a PNG, JPEG or DICOM Part 10 file$"):
        read_image_file(tmp_path / "bad.png", "--mask")
    with pytest.raises(InvalidInput, match=f"^images: {tmp_path}/gone.png: No such file or directory$"):
        read_image_file(tmp_path / "gone.png", "images")
    with pytest.raises(InvalidInput, match="^--image: .*: Is a directory$"):
        read_image_file(tmp_path, "--image")


def test_png_roundtrip_keeps_bit_depth():
    pixels = np.random.default_rng(0).random((30, 20)).astype(np.float32)
    for depth in (8, 16):
        dec = decode_image(encode_png(pixels, depth))
        assert dec.bit_depth == depth
        assert np.array_equal(dec.pixels, quantize(pixels, depth))


@pytest.mark.parametrize(
    ("stored_as", "encode"),
    [
        ("RGB", lambda g: _png(np.repeat(g[..., None], 3, axis=2))),
        ("RGBA", lambda g: _png(np.dstack([g, g, g, np.full_like(g, 255)]))),
        ("P", lambda g: _png(Image.fromarray(g).convert("RGB").quantize(256))),
        ("RGB", lambda g: _jpeg(Image.fromarray(np.repeat(g[..., None], 3, axis=2)))),  # YCbCr, chroma rounded
    ],
)
def test_grey_stored_in_colour_is_read_as_grey_and_said(stored_as, encode):
    grey = _grey()
    decoded = decode_image(encode(grey))
    assert decoded.colour == stored_as and decoded.bit_depth == 8
    assert np.abs(decoded.pixels - grey / 255).max() < 0.05


def test_real_colour_is_refused_in_every_colour_mode_but_a_mask_may_be_drawn_in_colour():
    rgb = np.repeat(_grey()[..., None], 3, axis=2)
    rgb[4:8, 4:20] = (255, 0, 0)  # a red annotation on the film
    for data in (_png(rgb), _png(Image.fromarray(rgb).convert("P")), _jpeg(Image.fromarray(rgb))):
        with pytest.raises(ImageError, match="colour image .* is not accepted: PRISM edits greyscale X-rays") as info:
            decode_image(data)
        assert info.value.kind == "invalid"
    mask = decode_image(_png(rgb), accept_colour=True)
    assert keep_mask(mask)[5, 5] and mask.colour == "RGB"
