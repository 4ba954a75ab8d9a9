"""``prism batch``: a folder and a manifest to a dataset folder, through the service and locally,
resumable, with the same layout either way."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import zipfile
from pathlib import Path

import httpx

from service.contract.datasets import MANIFEST, dataset_names
from tests.helpers import phantom_batch
from tests.stack import prism

OPTIONS = ["--edit", "Support Devices=0", "--steps", "4", "--inversion", "negative_prompt", "--self-replace", "0.5"]


def _folder(tmp: Path, n: int) -> tuple[Path, Path, list[dict]]:
    archive, manifest, rows = phantom_batch(n, dicom_every=3)
    zipfile.ZipFile(io.BytesIO(archive)).extractall(tmp / "images")
    (tmp / "manifest.csv").write_bytes(manifest)
    return tmp / "images", tmp / "manifest.csv", rows


def _batch(images: Path, manifest: Path, out: Path, *extra: str) -> dict:
    args = ["batch", "--images", str(images), "--manifest", str(manifest), "--out", str(out), *OPTIONS, *extra]
    run = subprocess.run(prism(*args), capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr
    assert "batch: 100%" in run.stderr  # the progress bar over the set
    return json.loads(run.stdout.splitlines()[-1])


def _lines(out: Path) -> dict[str, dict]:
    return {row["path"]: row for row in csv.DictReader((out / MANIFEST).open())}


def _expected_files(out: Path) -> set[str]:
    names = {MANIFEST}
    for path, row in _lines(out).items():
        if row["status"] == "succeeded":
            result = json.loads((out / dataset_names(path, ["result.json"])["result.json"]).read_text())
            files = ["counterfactual.png", "difference.png", "difference.npy", "result.json"]
            if result["input_format"] == "dicom":
                files += ["counterfactual.dcm", "difference.dcm"]
            names |= set(dataset_names(path, files).values())
    return names


def _written(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def test_through_the_service_resumable_and_like_a_local_run(builtin_service, tmp_path):
    images, manifest, rows = _folder(tmp_path, 6)
    url = builtin_service.url
    before = httpx.get(f"{url}/batches", timeout=60).json()["total"]

    summary = _batch(images, manifest, tmp_path / "remote", "--url", url)

    with_devices = sum(1 for r in rows if r["Support Devices"] == 1)
    assert summary["n"] == 6 and summary["skipped"] == 6 - with_devices
    assert summary["succeeded"] == with_devices and summary["failed"] == {}
    remote = tmp_path / "remote"
    assert _written(remote) == _expected_files(remote)
    lines = _lines(remote)
    assert [int(lines[r["Path"]]["line"]) for r in rows] == list(range(2, 8))
    for line in lines.values():
        if line["status"] == "succeeded":
            job = httpx.get(f"{url}/jobs/{line['job_id']}", timeout=60).json()
            assert float(line["s_clip"]) == job["result"]["s_clip"]
    assert httpx.get(f"{url}/batches", timeout=60).json()["total"] == before + 1

    # a re-run finds everything done: nothing is sent, nothing changes
    again = _batch(images, manifest, remote, "--url", url)
    assert again["succeeded"] == summary["succeeded"] and again["skipped"] == summary["skipped"]
    assert httpx.get(f"{url}/batches", timeout=60).json()["total"] == before + 1
    assert _lines(remote) == lines

    # a row lost from the output is run again, alone
    (remote / MANIFEST).write_text(
        "\n".join(t for t in (remote / MANIFEST).read_text().splitlines() if not t.startswith("2,")) + "\n"
    )
    _batch(images, manifest, remote, "--url", url)
    assert _lines(remote) == {**lines, rows[0]["Path"]: _lines(remote)[rows[0]["Path"]]}
    assert httpx.get(f"{url}/batches", timeout=60).json()["total"] == before + 2

    local = tmp_path / "local"
    summary_local = _batch(images, manifest, local)
    assert summary_local["succeeded"] == with_devices
    assert _written(local) == _written(remote)
    assert {p: r["status"] for p, r in _lines(local).items()} == {p: r["status"] for p, r in lines.items()}


def test_a_bad_manifest_stops_before_anything_runs(tmp_path):
    images, manifest, _ = _folder(tmp_path, 3)
    manifest.write_text(manifest.read_text().replace("scans/p001.png", "scans/missing.png").replace(",1,", ",2,", 1))
    args = ["batch", "--images", str(images), "--manifest", str(manifest), "--out", str(tmp_path / "out"), *OPTIONS]
    run = subprocess.run(prism(*args), capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert "--manifest" in run.stderr and "line 2" in run.stderr
    assert not (tmp_path / "out").exists()
