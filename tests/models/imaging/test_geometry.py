import io

import numpy as np
import pytest
from PIL import Image

from models.imaging.difference import difference, encode_rgb_png, render_difference
from models.imaging.geometry import (
    decode_image,
    encode_png,
    from_model_output,
    keep_mask,
    quantize,
    read_image_file,
    to_model_input,
)
from models.request.errors import ImageError, InvalidInput


def _png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, **kw).save(buf, format="PNG")
    return buf.getvalue()


def test_portrait_image_is_padded_not_cropped_and_maps_back():
    h, w = 120, 60
    yy, xx = np.mgrid[0:h, 0:w]
    img = (0.5 + 0.4 * np.sin(yy / 15) * np.cos(xx / 10)).astype(np.float32)
    x, geom = to_model_input(img, 64)
    assert x.shape == (1, 1, 64, 64)
    assert (geom.side, geom.top, geom.left) == (120, 0, 30)
    # left and right pads are black, the image sits in the middle (nothing cut away)
    assert x[0, 0, :, :12].max() < 0.05 and x[0, 0, :, 20:44].mean() > 0.3
    back = from_model_output(x[0, 0], geom)
    assert back.shape == (h, w)
    assert np.abs(back[:, 5:-5] - img[:, 5:-5]).mean() < 0.02


def test_decode_16bit_grayscale_and_rgb():
    arr16 = (np.arange(64 * 32).reshape(64, 32) * 31).astype(np.uint16)
    dec = decode_image(_png(arr16))
    assert dec.bit_depth == 16 and dec.pixels.shape == (64, 32)
    assert np.allclose(dec.pixels, arr16 / 65535.0, atol=1e-7)
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[..., 1] = 255
    dec = decode_image(_png(rgb))
    assert dec.bit_depth == 8 and dec.pixels.shape == (10, 20)
    assert np.allclose(dec.pixels, 0.587, atol=1e-6)


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


def test_difference_is_signed_float_not_wrapped_uint8():
    a = np.array([[0.1, 0.9]], np.float32)
    b = np.array([[0.6, 0.2]], np.float32)
    d = difference(a, b)
    assert d.dtype == np.float32 and np.allclose(d, [[-0.5, 0.7]])
    rendered, scale = render_difference(d, scale=0.7)
    rgb = np.asarray(Image.open(io.BytesIO(encode_rgb_png(rendered))))
    assert np.array_equal(rgb, rendered)
    assert scale == 0.7
    assert tuple(rgb[0, 1]) == (255, 0, 0)  # brighter in the counterfactual: red
    assert rgb[0, 0, 2] == 255 and rgb[0, 0, 0] < 100  # darker: blue
