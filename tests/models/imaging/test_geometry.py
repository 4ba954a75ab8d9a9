import io

import numpy as np
from PIL import Image

from models.imaging.difference import difference, encode_rgb_png, render_difference
from models.imaging.geometry import from_model_output, to_model_input


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
