"""Each method through the real stack on the built-in model, and the guided method's anatomy mask."""

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from phantoms.bench import bench_case
from phantoms.captions import explicit_caption
from phantoms.render import anatomy_mask, render
from tests.helpers import png_bytes
from tests.stack import poll, submit


@pytest.fixture(scope="module")
def phantom():
    anatomy, source, target, _ = bench_case("remove_devices", 3, 128)
    pixels = np.round(render(anatomy, source) * 255) / 255
    fields = {"original_prompt": explicit_caption(source), "edit_prompt": explicit_caption(target)}
    return pixels, anatomy_mask(anatomy), fields


def _run(url: str, image: bytes, fields: dict, mask: bytes | None = None) -> dict:
    files = {"image": ("phantom.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    r = httpx.post(f"{url}/counterfactual", files=files, data=fields, timeout=60)
    assert r.status_code == 202, r.text
    status = poll(url, r.json()["id"], {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    return status


@pytest.mark.parametrize(
    "options",
    [
        {"method": "prism", "steps": "5", "self_replace_steps": "0.5", "blend_words": "support devices"},
        {"method": "sdedit", "steps": "10", "strength": "0.55", "guidance_scale": "4"},
        {"method": "guided", "steps": "5", "classifier_targets": "Support Devices=0"},
    ],
)
def test_every_method_runs_end_to_end(builtin_service, phantom, options):
    pixels, _, prompts = phantom
    status = _run(builtin_service.url, png_bytes(pixels), {**prompts, **options})
    result = status["result"]
    assert result["method"] == options["method"] and -1 <= result["s_clip"] <= 1
    assert set(result["files"]) == {
        "counterfactual.png",
        "difference.png",
        "difference.npy",
        "reconstruction.png",
        "result.json",
    }
    assert (result["inversion"] is None) == (options["method"] != "prism")


def test_guided_keeps_the_uploaded_anatomy(builtin_service, phantom):
    pixels, keep, prompts = phantom
    mask = png_bytes(keep.astype(np.float32))
    fields = {**prompts, "method": "guided", "steps": "6", "classifier_targets": "Support Devices=0"}
    status = _run(builtin_service.url, png_bytes(pixels), fields, mask)
    assert status["result"]["anatomy_mask"] is True
    cf = httpx.get(builtin_service.url + status["result"]["files"]["counterfactual.png"]).content
    counterfactual = np.asarray(Image.open(io.BytesIO(cf)), np.float32) / 255
    np.testing.assert_array_equal(counterfactual[keep], pixels[keep].astype(np.float32))
    assert np.abs(counterfactual - pixels).max() > 0.05


def test_a_mask_of_another_size_is_refused(service):
    image = png_bytes(np.full((32, 32), 0.5, np.float32))
    files = {"image": ("x.png", image, "image/png"), "mask": ("m.png", png_bytes(np.ones((16, 32))), "image/png")}
    data = {
        "original_prompt": "chest x-ray",
        "edit_prompt": "chest x-ray of a patient",
        "method": "guided",
        "classifier_targets": "Edema=1",
    }
    r = httpx.post(f"{service.url}/counterfactual", files=files, data=data, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mask"]


def test_guided_needs_targets(service):
    r = submit(service.url, method="guided")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "classifier_targets"]


def test_guided_without_a_classifier_fails_with_its_reason(service):
    r = submit(service.url, method="guided", classifier_targets="Support Devices=0")
    status = poll(service.url, r.json()["id"], {"succeeded", "failed"})
    assert status["status"] == "failed" and status["error"]["code"] == "invalid_parameters"
    assert "method" in status["error"]["message"]
