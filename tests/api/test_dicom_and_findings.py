"""DICOM and findings through the real stack: a succeeded job with a valid counterfactual.dcm, or the
4xx that names the reason."""

import io

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless

from models.imaging.dicom import DIFFERENCE_COMMENTS, IMAGE_COMMENTS, read_dicom
from tests.dicom_files import (
    STUDY,
    encode,
    grey_in_colour,
    jpeg_baseline,
    jpeg_lossless,
    radiograph,
    structured_report,
)
from tests.models.imaging.test_dicom import REFUSALS, _voi_lut
from tests.stack import poll, submit, wait_for

DICOM_FILES = {"counterfactual.dcm", "difference.dcm"}
DICOM_OUTPUTS = {*DICOM_FILES, "report.dcm"}
OUTPUTS = ("counterfactual.dcm", "counterfactual.png")


def _monochrome1_voi() -> Dataset:
    ds, _ = radiograph(bits_stored=12, photometric="MONOCHROME1")
    _voi_lut(ds, 12)
    return ds


def _rescaled_window() -> Dataset:
    ds, _ = radiograph(bits_stored=12)
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 2, -1000, 2000, 6000
    return ds


def _compressed(uid) -> Dataset:
    ds, _ = radiograph(bits_stored=16)
    ds.compress(uid)
    return ds


GOOD = {
    "MONOCHROME1 with a VOI LUT": _monochrome1_voi,
    "12-bit with rescale and window": _rescaled_window,
    "RLE": lambda: _compressed(RLELossless),
    "JPEG lossless": lambda: jpeg_lossless(*radiograph(bits_stored=12)),
    "JPEG 2000": lambda: _compressed(JPEG2000Lossless),
}


@pytest.mark.parametrize("name", GOOD)
def test_dicom_inputs_give_a_secondary_capture_in_the_same_study(service, name):
    ds = GOOD[name]()
    r = submit(service.url, encode(ds))
    assert r.status_code == 202, r.text
    status = poll(service.url, r.json()["id"], {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    result = status["result"]
    assert result["input_format"] == "dicom" and DICOM_OUTPUTS <= set(result["files"])
    files = {n: httpx.get(service.url + result["files"][n], timeout=30) for n in OUTPUTS}
    assert files["counterfactual.dcm"].headers["content-type"] == "application/dicom"
    out = dcmread(io.BytesIO(files["counterfactual.dcm"].content))
    assert out.StudyInstanceUID == STUDY and out.SeriesInstanceUID != ds.SeriesInstanceUID
    assert out.PatientID == ds.PatientID and out.PhotometricInterpretation == ds.PhotometricInterpretation
    assert out.BitsStored == ds.BitsStored and list(out.ImageType) == ["DERIVED", "SECONDARY"]
    assert "NOT FOR DIAGNOSIS" in out.SeriesDescription and "NOT FOR DIAGNOSIS" in out.ImageComments
    assert (out.Rows, out.Columns) == (ds.Rows, ds.Columns)
    png = np.asarray(Image.open(io.BytesIO(files["counterfactual.png"].content)), np.float64) / 65535
    shown, _ = read_dicom(files["counterfactual.dcm"].content, 10**8)
    np.testing.assert_allclose(shown, png, atol=1.0 / (2 ** int(ds.BitsStored) - 1) + 1e-6)


def _outputs(url: str, data: bytes) -> tuple[dict, list[Dataset]]:
    status = poll(url, submit(url, data, steps="2").json()["id"], {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    files = status["result"]["files"]
    return status["result"], [dcmread(io.BytesIO(httpx.get(url + files[n]).content)) for n in sorted(DICOM_FILES)]


def test_a_lossy_source_marks_both_outputs_lossy_and_grey_in_colour_comes_back_monochrome(service):
    _, (counterfactual, difference) = _outputs(service.url, encode(jpeg_baseline(*radiograph(bits_stored=8))))
    for image in (counterfactual, difference):
        assert image.LossyImageCompression == "01" and image.LossyImageCompressionMethod == "ISO_10918_1"
    assert counterfactual.ImageComments == IMAGE_COMMENTS and difference.ImageComments == DIFFERENCE_COMMENTS
    result, (counterfactual, _) = _outputs(service.url, encode(grey_in_colour(*radiograph(bits_stored=8))))
    assert result["input_colour"] == "RGB" and counterfactual.PhotometricInterpretation == "MONOCHROME2"
    assert "LossyImageCompression" not in counterfactual


@pytest.mark.parametrize("name", REFUSALS)
def test_dicom_refusals_are_4xx_naming_the_reason(service, name):
    make, kind, needle = REFUSALS[name]
    r = submit(service.url, make())
    assert r.status_code == {"invalid": 422, "unsupported": 415}[kind], r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "image"] and needle in detail["msg"]


def _corrupt_jpeg2000() -> bytes:
    data = bytearray(encode(_compressed(JPEG2000Lossless)))
    start = data.index(b"\xff\x4f\xff\x51")  # SOC, SIZ: the codestream's header
    data[start + 4 : start + 40] = bytes(36)  # every decoder fails, and pydicom logs each failure at ERROR
    return bytes(data)


def test_a_refused_dicom_leaves_no_error_and_no_tag_in_the_logs(service):
    r = submit(service.url, _corrupt_jpeg2000())
    assert r.status_code == 422 and "cannot be decoded" in r.json()["detail"][0]["msg"], r.text
    log = wait_for(service.log.read_text, lambda text: r.headers["X-Request-ID"] in text, "the 422's log line", 60)
    lines = [line for line in log.splitlines() if "ERROR" in line or "pydicom" in line or "Doe" in line]
    assert not lines, lines


def test_structured_report_is_not_an_image(service):
    r = submit(service.url, structured_report())
    assert r.status_code == 415 and "not an image" in r.json()["detail"][0]["msg"]


def test_png_input_gets_no_dicom_files(service):
    from tests.helpers import png_bytes, xray_like

    status = poll(service.url, submit(service.url, png_bytes(xray_like(32, 32))).json()["id"], {"succeeded", "failed"})
    assert status["result"]["input_format"] == "image" and not DICOM_OUTPUTS & set(status["result"]["files"])
    job = status["id"]
    assert httpx.get(f"{service.url}/jobs/{job}/files/counterfactual.dcm").status_code == 404


def test_findings_become_prompts_shown_in_the_status(service):
    fields = {"original_prompt": "", "edit_prompt": "", "findings": '{"Support Devices": 1, "Edema": -1}'}
    r = submit(service.url, **fields, edit="Support Devices=0")
    assert r.status_code == 202, r.text
    status = poll(service.url, r.json()["id"], {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    assert status["prompts"] == {
        "original_prompt": "Chest X-ray showing Support Devices",
        "edit_prompt": "Normal chest X-ray with no significant findings",
    }
    assert status["result"]["parameters"]["blend_words"] == ["Support Devices"]
    # the prompts shown are those the worker ran
    assert status["result"]["original_prompt"] == status["prompts"]["original_prompt"]
    assert status["result"]["edit_prompt"] == status["prompts"]["edit_prompt"]


@pytest.mark.parametrize(
    ("fields", "field", "needle"),
    [
        ({"findings": '{"Support Devices": 1}'}, "findings", "not both"),
        ({"original_prompt": "", "edit_prompt": "", "findings": "Support Devices=1"}, "edit", "go together"),
        ({"original_prompt": "", "edit_prompt": "", "edit": "Support Devices=1"}, "findings", "go together"),
        ({"original_prompt": "", "edit_prompt": "", "findings": "Pacemaker=1", "edit": "Edema=1"}, "findings", "14"),
        ({"original_prompt": "", "edit_prompt": "", "findings": "Edema=-1", "edit": "Edema=0"}, "edit", "changes no"),
    ],
)
def test_bad_findings_are_422_naming_the_field(service, fields, field, needle):
    r = submit(service.url, **fields)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(field in d["loc"] and needle in d["msg"] for d in detail), detail
