"""``prism batch``: a folder and a manifest to a dataset folder, through the service and locally,
resumable, with the same layout either way; hostile names refused by both routes and odd ones
written under the folder; Ctrl-C stops it with one line."""

from __future__ import annotations

import csv
import io
import json
import signal
import socket
import subprocess
import unicodedata
import zipfile
from pathlib import Path

import httpx

from models.request.manifest import clean_path
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
                files += ["counterfactual.dcm", "difference.dcm", "report.dcm"]
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
    _, manifest, _ = _folder(tmp_path, 3)  # a row with a value past the header, and a spreadsheet's empty rows
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([*lines[:3], lines[3] + ",oops", ",,,", ",,,,,,,,,,,,,,,,,,,,,"]) + "\n")
    run = subprocess.run(prism(*args), capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "1 bad rows: line 4 (column 16): a value beyond the header's 15 columns" in run.stderr


UIDS = ("pacs/1.2.826.0.1.3680043.8.498.11", "pacs/1.2.826.0.1.3680043.8.498.12")
ACCENTED = "échographies/thorax é.png"
ODD_ROWS = ("pacs\\1.2.826.0.1.3680043.8.498.11;1", "./pacs/1.2.826.0.1.3680043.8.498.12;1", f"{ACCENTED};1")
"""As a spreadsheet in a ';' locale and a Windows or macOS folder write them: a backslash, a leading
'./', UID names whose last part looks like an extension, a composed name stored decomposed."""
HOSTILE_ROWS = ("../../evil/p000.png;1", "/tmp/evil/p001.png;1")
FAST = ["--edit", "Support Devices=0", "--steps", "2", "--inversion", "direct", "--self-replace", "0.5"]


def _odd_folder(tmp: Path, rows: tuple[str, ...]) -> tuple[Path, Path]:
    archive = zipfile.ZipFile(io.BytesIO(phantom_batch(3)[0]))
    pngs = [archive.read(name) for name in sorted(archive.namelist())]
    images = tmp / "images"
    for name, png in zip((*UIDS, unicodedata.normalize("NFD", ACCENTED)), pngs, strict=True):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(png)
    manifest = tmp / "manifest.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(["Path;Support Devices", *rows, ""]).encode())
    return images, manifest


def _run(images: Path, manifest: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["batch", "--images", str(images), "--manifest", str(manifest), "--out", str(out), *FAST, *extra]
    return subprocess.run(prism(*args), capture_output=True, text=True, timeout=1800)


def test_hostile_names_are_refused_by_both_routes_and_odd_ones_land_under_the_folder(builtin_service, tmp_path):
    url = builtin_service.url
    images, hostile = _odd_folder(tmp_path, (*ODD_ROWS, *HOSTILE_ROWS))
    for route in ([], ["--url", url]):
        refused = _run(images, hostile, tmp_path / "out", *route)
        assert refused.returncode == 2, refused.stderr
        assert "line 5 (Path): the image's path climbs out of its folder" in refused.stderr
        assert "line 6 (Path): the image's path is absolute" in refused.stderr
    files = {"images": ("b.zip", phantom_batch(1)[0]), "manifest": ("m.csv", hostile.read_bytes())}
    direct = httpx.post(f"{url}/batches", files=files, data={"edit": "Support Devices=0"}, timeout=60)
    assert direct.status_code == 422
    assert [d["loc"][2:] for d in direct.json()["detail"] if d["loc"][2:3] in ([5], [6])] == [[5, "Path"], [6, "Path"]]
    assert not (tmp_path / "out").exists() and not list(tmp_path.rglob("evil"))

    _, odd = _odd_folder(tmp_path, ODD_ROWS)
    files = ["counterfactual.png", "difference.png", "difference.npy", "result.json"]
    expected = {MANIFEST} | {name for p in (*UIDS, ACCENTED) for name in dataset_names(p, files).values()}
    assert len(expected) == 1 + 3 * len(files)  # the UID names' outputs are apart
    for route, out in (([], tmp_path / "local"), (["--url", url], tmp_path / "remote")):
        done = _run(images, odd, out, *route)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1])["succeeded"] == 3
        written = [p for p in out.rglob("*") if p.is_file()]
        assert all(p.resolve().is_relative_to(out.resolve()) for p in written)
        assert {unicodedata.normalize("NFC", p.relative_to(out).as_posix()) for p in written} == expected
    assert {p.name for p in tmp_path.iterdir()} == {"images", "manifest.csv", "local", "remote"}
    batch_id = httpx.get(f"{url}/batches", timeout=60).json()["batches"][0]["id"]
    dataset = zipfile.ZipFile(io.BytesIO(httpx.get(f"{url}/batches/{batch_id}/dataset.zip", timeout=300).content))
    assert all(clean_path(name) == name for name in dataset.namelist())
    assert set(dataset.namelist()) == expected


def test_ctrl_c_stops_with_one_line_saying_how_to_resume(tmp_path):
    images, manifest, _ = _folder(tmp_path, 3)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # a service that takes the batch and never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        args = ["batch", "--images", str(images), "--manifest", str(manifest), "--out", str(tmp_path / "out")]
        run = subprocess.Popen(prism(*args, *OPTIONS, "--url", url), stderr=subprocess.PIPE, text=True)
        silent.settimeout(0.2)
        while True:
            try:
                connection, _ = silent.accept()
                break
            except TimeoutError:
                assert run.poll() is None, run.stderr.read()
        connection.settimeout(300)
        received = b""
        while b"\r\n\r\n" not in received:  # the request's head is in: the client is sending or waiting
            received += connection.recv(65536)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=300)
        connection.close()
    assert run.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("prism batch: interrupted; run the same command again to resume"), stderr
