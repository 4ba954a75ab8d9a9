"""The README's Orthanc recipe, as a hospital would install it: its Lua script in a real Orthanc
(with DICOMweb) in front of the real stack. A new study's frontal DX radiograph is uploaded when
the study is stable, its outputs come back into the study by STOW-RS, Orthanc keeps answering
meanwhile, and the outputs' arrival starts no other job; a study without one frontal radiograph
is left alone. Only the service's address, and faster edit settings, are changed in the script."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from cli.local_redis import free_port
from tests.dicom_files import encode, radiograph
from tests.pacs import PASSWORD, USER, Orthanc
from tests.stack import Cluster, wait_for

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
STABLE_AGE_S = 1


def _script(prism_url: str) -> str:
    (lua,) = re.findall(r"```lua\n(.*?)```", README, flags=re.S)
    address = "local PRISM = 'http://prism:8000/counterfactual'"
    speed = "    .. part('store_to', 'radiology')\n"
    assert address in lua and speed in lua, "the README's script changed: adapt this test"
    lua = lua.replace(address, f"local PRISM = '{prism_url}/counterfactual'")
    return lua.replace(speed, speed + "    .. part('steps', '3') .. part('self_replace_steps', '0.5')\n")


def _series(orthanc: Orthanc, study: str) -> list[dict]:
    return [s["MainDicomTags"] for s in orthanc.get(f"/studies/{study}/series").json()]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model_dir):
    directory = tmp_path_factory.mktemp("recipe")
    http_port = free_port()
    endpoints = directory / "pacs.toml"
    endpoints.write_text(
        "[endpoints.radiology.dicomweb]\n"
        f'url = "http://127.0.0.1:{http_port}/dicom-web"\nauth = "basic"\nusername = "{USER}"\n'
        f'password_file = "{directory / "password"}"\n'
    )
    (directory / "password").write_text(PASSWORD)
    with Cluster(directory / "stack", tiny_model_dir, workers=1, PRISM_PACS_FILE=str(endpoints)) as cluster:
        (directory / "prism.lua").write_text(_script(cluster.url))
        settings = {"StableAge": STABLE_AGE_S, "LuaScripts": [str(directory / "prism.lua")]}
        orthanc = Orthanc(directory / "orthanc", http_port, **settings)
        try:
            yield orthanc, cluster
        finally:
            orthanc.close()


def _study(modality: str, view: str | None) -> tuple[str, bytes]:
    ds, _ = radiograph(64, 48)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), modality
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if view is not None:
        ds.ViewPosition = view
    return ds.StudyInstanceUID, encode(ds)


def _jobs(cluster: Cluster) -> list[dict]:
    return httpx.get(f"{cluster.url}/jobs", params={"limit": 100}, timeout=30).json()["jobs"]


def test_a_new_radiograph_is_edited_and_its_outputs_come_back_once(recipe):
    orthanc, cluster = recipe
    uid, data = _study("DX", "PA")
    study = orthanc.upload(data)

    def stored_back() -> bool:
        return len(_series(orthanc, study)) == 3  # the radiograph's, the images', the report's

    wait_for(stored_back, bool, "the outputs stored back into the study", stall_s=120, every_s=0.5)
    descriptions = sorted(s.get("SeriesDescription", "") for s in _series(orthanc, study))
    assert sum("NOT FOR DIAGNOSIS" in d for d in descriptions) == 2, descriptions
    (job,) = _jobs(cluster)
    status = httpx.get(f"{cluster.url}/jobs/{job['id']}", timeout=30).json()
    assert status["status"] == "succeeded", status
    stored = status["result"]["stored"]
    assert stored["endpoint"] == "radiology" and stored["protocol"] == "STOW-RS"
    assert len(stored["instances"]) == 3
    time.sleep(STABLE_AGE_S * 5)  # the study, changed by the outputs, is stable again: the script skips it
    assert [j["id"] for j in _jobs(cluster)] == [job["id"]]
    assert len(_series(orthanc, study)) == 3
    assert "PRISM: the submission" not in orthanc.log.read_text(errors="replace")
    assert uid not in cluster.logs()  # the service's logs never carry a UID


def test_a_study_without_a_frontal_radiograph_is_left_alone(recipe):
    orthanc, cluster = recipe
    before = len(_jobs(cluster))
    studies = [
        orthanc.upload(_study(modality, view)[1]) for modality, view in [("CT", None), ("DX", "LL"), ("CR", None)]
    ]
    wait_for(lambda: all(orthanc.get(f"/studies/{s}").json()["IsStable"] for s in studies), bool, "stable studies")
    time.sleep(STABLE_AGE_S * 3)  # what the script would have sent by now is in the queue
    assert len(_jobs(cluster)) == before
    assert [len(_series(orthanc, study)) for study in studies] == [1, 1, 1]
