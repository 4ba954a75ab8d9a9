"""The PACS round trip against a real PACS (Orthanc with DICOMweb, ``tests/pacs.py``) through the
real stack: the frontal radiograph of a study is found, retrieved and edited as an upload is, and
the outputs and the report are stored back into its study by STOW-RS or C-STORE, once however
often they are stored; what cannot be (unknown endpoint, unknown study, no or two frontal images,
a PACS that is down at submit or at store time) is a clear refusal or a job failure with its code."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, generate_uid

from cli.local_redis import free_port
from models.request.params import DICOM_FILES
from service.contract.pacs import Pacs, load_endpoints
from tests.api.test_batches import dataset, wait_completed
from tests.dicom_files import encode, radiograph
from tests.pacs import Orthanc
from tests.stack import Cluster, poll, submit

FIELDS = {"original_prompt": "chest x-ray with support devices", "edit_prompt": "chest x-ray without support devices"}
FAST = {"steps": "3", "self_replace_steps": "0.5"}


def _image(study: str, view: str | None, modality: str = "DX", seed: int = 0):
    ds, _ = radiograph(64, 48, seed=seed)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, generate_uid(), modality
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if view is not None:
        ds.ViewPosition = view
    return ds


@pytest.fixture(scope="module")
def pacs(orthanc, tmp_path_factory, tiny_model_dir):
    """A stack that knows the session's Orthanc as ``radiology`` (DICOMweb) and ``peer`` (C-STORE),
    and a ``down`` endpoint nothing listens on; a store is tried 3 times, 0.1 s apart and more."""
    directory = tmp_path_factory.mktemp("pacs")
    down = {"url": f"http://127.0.0.1:{free_port()}/dicom-web"}
    endpoints = orthanc.endpoints_file(directory / "pacs.toml", down=down)
    settings = {"PRISM_PACS_FILE": str(endpoints), "PRISM_PACS_RETRIES": "2", "PRISM_PACS_RETRY_FIRST_S": "0.1"}
    with Cluster(directory / "stack", tiny_model_dir, workers=1, **settings) as cluster:
        yield orthanc, cluster, endpoints


def _submit(url: str, image: bytes | None = None, **fields) -> httpx.Response:
    """POST /counterfactual as a multipart form: text fields and, if given, an image."""
    parts = [(name, (None, value)) for name, value in {**FIELDS, **FAST, **fields}.items()]
    if image is not None:
        parts.append(("image", ("study.dcm", image, "application/dicom")))
    return httpx.post(f"{url}/counterfactual", files=parts, timeout=120)


def _succeeded(url: str, response: httpx.Response) -> dict:
    assert response.status_code == 202, response.text
    final = poll(url, response.json()["id"], {"succeeded", "failed"})
    assert final["status"] == "succeeded", final
    return final


def _outputs(orthanc: Orthanc, study: str, source: str) -> dict[str, list[pydicom.Dataset]]:
    """What of the study is not ``source``'s own series, by modality (SC images carry the input's)."""
    found: dict[str, list] = {}
    for ds in orthanc.instances(study):
        if ds.SOPInstanceUID != source and ds.SOPClassUID in (SecondaryCaptureImageStorage, ComprehensiveSRStorage):
            found.setdefault("SR" if ds.SOPClassUID == ComprehensiveSRStorage else "SC", []).append(ds)
    return found


def _check_stored(orthanc: Orthanc, study: str, source: pydicom.Dataset, result: dict, protocol: str) -> None:
    """The two Secondary Captures and the report are in the study, once, and point at each other."""
    stored = result["stored"]
    assert stored["protocol"] == protocol and [i["file"] for i in stored["instances"]] == list(DICOM_FILES)
    found = _outputs(orthanc, study, source.SOPInstanceUID)
    assert len(found["SC"]) == 2 and len(found["SR"]) == 1, {k: len(v) for k, v in found.items()}
    by_uid = {ds.SOPInstanceUID: ds for ds in found["SC"] + found["SR"]}
    assert set(by_uid) == {i["sop_instance_uid"] for i in stored["instances"]}
    for image in found["SC"]:
        assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert image.StudyInstanceUID == study and "NOT FOR DIAGNOSIS" in image.SeriesDescription
    report = found["SR"][0]
    references = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in report.ContentSequence if item.ValueType == "IMAGE"}  # fmt: skip
    assert references == {source.SOPInstanceUID, *(ds.SOPInstanceUID for ds in found["SC"])}
    s_clip = next(i for i in report.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "S-CLIP")
    assert float(s_clip.MeasuredValueSequence[0].NumericValue) == pytest.approx(result["s_clip"], abs=1e-6)


def test_the_frontal_radiograph_of_a_study_is_edited_as_an_upload(pacs):
    orthanc, cluster, _ = pacs
    study = generate_uid()
    frontal, lateral = _image(study, "PA", seed=1), _image(study, "LL", seed=2)
    orthanc.store(frontal, lateral, _image(study, None, modality="CT", seed=3))
    response = _submit(cluster.url, source="radiology", study_uid=study)
    assert response.status_code == 202, response.text
    final = poll(cluster.url, response.json()["id"], {"succeeded", "failed"})
    assert final["status"] == "succeeded", final
    assert final["result"]["input_format"] == "dicom" and "counterfactual.dcm" in final["links"]["files"]
    dcm = httpx.get(f"{cluster.url}{final['links']['files']['counterfactual.dcm']}", timeout=60).content
    output = pydicom.dcmread(io.BytesIO(dcm))
    assert output.StudyInstanceUID == study and (output.Rows, output.Columns) == (64, 48)
    assert output.SourceImageSequence[0].ReferencedSOPInstanceUID == frontal.SOPInstanceUID
    by_instance = _submit(
        cluster.url, source="radiology", study_uid=study, series_uid=lateral.SeriesInstanceUID,
        sop_uid=lateral.SOPInstanceUID,
    )  # fmt: skip
    assert by_instance.status_code == 202, by_instance.text  # an instance named is used as it is


@pytest.mark.parametrize(
    ("fields", "status", "loc", "words"),
    [
        ({"source": "nowhere", "study_uid": "1.2.3"}, 422, "source", "this service knows: down, peer, radiology"),
        ({"source": "radiology", "study_uid": "1.2.3.999"}, 404, "study_uid", "no such study"),
        ({"source": "radiology"}, 422, "study_uid", "source and study_uid go together"),
        ({"study_uid": "1.2.3"}, 422, "source", "source and study_uid go together"),
        ({"source": "radiology", "study_uid": "1.2.x"}, 422, "study_uid", "pattern"),
        ({"source": "peer", "study_uid": "1.2.3"}, 422, "source", "no DICOMweb URL"),
        ({}, 422, "image", "give an image, or a source and study_uid"),
    ],
)
def test_a_reference_that_cannot_be_used_is_refused_naming_the_field(pacs, fields, status, loc, words):
    _, cluster, _ = pacs
    response = _submit(cluster.url, **fields)
    assert response.status_code == status, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"][-1] == loc and words in detail["msg"], detail


def test_a_study_without_one_frontal_radiograph_is_refused_saying_what_it_holds(pacs):
    orthanc, cluster, _ = pacs
    lateral_only, two_frontal = generate_uid(), generate_uid()
    orthanc.store(_image(lateral_only, "LL"), _image(two_frontal, "PA", seed=4), _image(two_frontal, "AP", seed=5))
    none = _submit(cluster.url, source="radiology", study_uid=lateral_only)
    assert none.status_code == 422 and "no frontal radiograph" in none.json()["detail"][0]["msg"]
    assert "found: DX LL" in none.json()["detail"][0]["msg"]
    two = _submit(cluster.url, source="radiology", study_uid=two_frontal)
    assert two.status_code == 422 and "2 frontal radiographs" in two.json()["detail"][0]["msg"]
    assert "name series_uid or sop_uid" in two.json()["detail"][0]["msg"]


def test_a_pacs_that_is_down_is_a_503_to_retry(pacs):
    _, cluster, _ = pacs
    response = _submit(cluster.url, source="down", study_uid="1.2.3")
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert response.json()["detail"][0]["type"] == "pacs_unavailable" and "unreachable" in response.text


def _store_again(cluster: Cluster, pacs_file: Path, name: str, final: dict) -> list[str]:
    """The job's DICOM outputs stored into ``name`` again, as a retried store would: their UIDs."""
    files = {n: httpx.get(f"{cluster.url}{final['links']['files'][n]}", timeout=60).content for n in DICOM_FILES}
    again = Pacs(name, load_endpoints(str(pacs_file))[name]).store(files)
    return [i.sop_instance_uid for i in again.instances]


def test_results_are_stored_back_by_stow_rs_once_however_often_they_are_stored(pacs):
    orthanc, cluster, pacs_file = pacs
    study = generate_uid()
    frontal = _image(study, "AP", seed=6)
    orthanc.store(frontal)
    final = _succeeded(cluster.url, _submit(cluster.url, source="radiology", study_uid=study, store_to="radiology"))
    result = final["result"]
    _check_stored(orthanc, study, frontal, result, "STOW-RS")
    for item in result["stored"]["instances"]:  # as the PACS answered (Orthanc leaves its port out)
        assert f"/dicom-web/studies/{study}/series/" in item["retrieve_url"]
        assert item["retrieve_url"].endswith(f"/instances/{item['sop_instance_uid']}")
    stored = httpx.get(f"{cluster.url}{final['links']['files']['result.json']}", timeout=60).json()["stored"]
    assert stored == result["stored"]  # result.json says it too
    uids = [i["sop_instance_uid"] for i in result["stored"]["instances"]]
    assert _store_again(cluster, pacs_file, "radiology", final) == uids
    _check_stored(orthanc, study, frontal, result, "STOW-RS")  # still one of each
    logs = cluster.logs()
    assert study not in logs and frontal.SOPInstanceUID not in logs and "stored to radiology by STOW-RS" in logs


def test_an_uploaded_dicom_is_stored_back_by_c_store_to_a_dicom_peer_once(pacs):
    orthanc, cluster, pacs_file = pacs
    study = generate_uid()
    source = _image(study, "PA", seed=7)  # uploaded, not in the PACS: its outputs go into its study there
    final = _succeeded(cluster.url, _submit(cluster.url, encode(source), store_to="peer"))
    assert [i["status"] for i in final["result"]["stored"]["instances"]] == ["0x0000"] * 3
    _check_stored(orthanc, study, source, final["result"], "C-STORE")
    _store_again(cluster, pacs_file, "peer", final)
    _check_stored(orthanc, study, source, final["result"], "C-STORE")


@pytest.mark.parametrize(
    ("image", "fields", "words"),
    [
        ("png", {"store_to": "radiology"}, "needs a DICOM input"),
        ("dicom", {"store_to": "nowhere"}, "no PACS endpoint 'nowhere'"),
        ("dicom", {"store_to": "radiology", "outputs": "counterfactual.png"}, "outputs holds none of"),
    ],
)
def test_a_store_to_that_cannot_be_used_is_refused_naming_it(pacs, image, fields, words):
    _, cluster, _ = pacs
    data = encode(_image(generate_uid(), "PA")) if image == "dicom" else None
    response = submit(cluster.url, data, **fields) if data is None else _submit(cluster.url, data, **fields)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"][-1] == "store_to" and words in detail["msg"], detail


def test_a_pacs_down_at_store_time_fails_that_job_with_its_code_and_nothing_else(pacs):
    orthanc, cluster, _ = pacs
    source = _image(generate_uid(), "PA", seed=8)
    response = _submit(cluster.url, encode(source), store_to="down")
    assert response.status_code == 202, response.text
    failed = poll(cluster.url, response.json()["id"], {"succeeded", "failed"})
    assert failed["status"] == "failed" and failed["error"]["code"] == "store_failed", failed
    assert "'down' is unreachable" in failed["error"]["message"] and "after 3 tries" in failed["error"]["message"]
    assert cluster.logs().count("trying again in") >= 2
    _succeeded(cluster.url, _submit(cluster.url, encode(source)))  # the worker goes on


def _post_manifest(url: str, manifest: str, archive: bytes | None = None, **fields) -> httpx.Response:
    files = {"manifest": ("manifest.csv", manifest.encode(), "text/csv")}
    if archive is not None:
        files["images"] = ("batch.zip", archive, "application/zip")
    return httpx.post(f"{url}/batches", files=files, data={**FIELDS, **FAST, **fields}, timeout=300)


def test_a_manifest_of_studies_gives_the_dataset_uploads_would_and_stores_back(pacs):
    orthanc, cluster, _ = pacs
    studies = [generate_uid(), generate_uid()]
    images = [_image(study, "PA", seed=10 + n) for n, study in enumerate(studies)]
    orthanc.store(*images, _image(studies[1], "LL", seed=12))
    by_reference = _post_manifest(cluster.url, "study_uid\n" + "\n".join(studies) + "\n", source="radiology",
                                  store_to="radiology")  # fmt: skip
    assert by_reference.status_code == 202, by_reference.text
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for study, image in zip(studies, images, strict=True):
            z.writestr(f"{study}.dcm", encode(image))
    uploaded = _post_manifest(cluster.url, "Path\n" + "\n".join(f"{s}.dcm" for s in studies) + "\n", archive.getvalue())
    assert uploaded.status_code == 202, uploaded.text
    names = []
    for response in (by_reference, uploaded):
        final = wait_completed(cluster.url, response.json()["id"])
        assert final["counts"]["succeeded"] == 2, final
        names.append(sorted(dataset(cluster.url, final["id"]).namelist()))
    assert names[0] == names[1] and f"reports/{studies[0]}.dcm" in names[0], names
    for study, image in zip(studies, images, strict=True):
        found = _outputs(orthanc, study, image.SOPInstanceUID)
        assert (len(found["SC"]), len(found["SR"])) == (2, 1)


@pytest.mark.parametrize(
    ("manifest", "fields", "loc", "words"),
    [
        ("study_uid\n1.2.3.999\n", {"source": "radiology"}, ["manifest", 2, "study_uid"], "no such study"),
        ("study_uid\n1.2.x\n", {"source": "radiology"}, ["manifest", 2, "study_uid"], "not a DICOM UID"),
        ("study_uid\n1.2.3\n", {}, ["source"], "the manifest names studies"),
        ("study_uid\n1.2.3\n", {"source": "nowhere"}, ["source"], "no PACS endpoint 'nowhere'"),
        ("Path,study_uid\na.png,1.2.3\n", {"source": "radiology"}, ["manifest"], "not both"),
        (
            "study_uid\n1.2.3\n",
            {"source": "radiology", "store_to": "radiology", "outputs": "counterfactual.png"},
            ["store_to"],
            "outputs holds none of",
        ),
    ],
)
def test_a_manifest_of_studies_that_cannot_run_is_refused_naming_the_cell(pacs, manifest, fields, loc, words):
    _, cluster, _ = pacs
    response = _post_manifest(cluster.url, manifest, **fields)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"][1:] == loc and words in detail["msg"], detail
