"""Batches through the real stack: a ZIP and a CheXpert manifest in, one job per row, a dataset
ZIP out; whole-manifest validation, archive refusals, cancel, and a worker killed mid-batch."""

from __future__ import annotations

import csv
import io
import signal
import zipfile

import httpx
import pytest

from service.contract.datasets import dataset_names
from tests.api.test_webhooks import SECRET, Receiver
from tests.helpers import phantom_batch, png_bytes, xray_like
from tests.stack import Cluster, wait_for, wait_running

FAST = {"steps": "4", "inversion": "negative_prompt", "self_replace_steps": "0.5"}
REMOVE_DEVICES = {"edit": "Support Devices=0", **FAST}


def post_batch(url: str, archive: bytes, manifest: bytes, headers: dict | None = None, **fields) -> httpx.Response:
    files = {"images": ("batch.zip", archive, "application/zip"), "manifest": ("manifest.csv", manifest, "text/csv")}
    return httpx.post(f"{url}/batches", files=files, data=fields, headers=headers or {}, timeout=300)


def batch(url: str, batch_id: str) -> dict:
    return httpx.get(f"{url}/batches/{batch_id}", timeout=60).json()


def wait_completed(url: str, batch_id: str) -> dict:
    def snapshot() -> tuple:
        body = batch(url, batch_id)
        return body["status"], body["ended"], tuple(i["status"] for i in body["items"])

    wait_for(snapshot, lambda s: s[0] == "completed", f"batch {batch_id}")
    return batch(url, batch_id)


def dataset(url: str, batch_id: str, **params) -> zipfile.ZipFile:
    response = httpx.get(f"{url}/batches/{batch_id}/dataset.zip", params=params, timeout=300)
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    return zipfile.ZipFile(io.BytesIO(response.content))


def manifest_rows(archive: zipfile.ZipFile) -> dict[str, dict]:
    return {row["path"]: row for row in csv.DictReader(io.StringIO(archive.read("manifest.csv").decode()))}


def zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_a_chexpert_batch_of_20_phantoms_becomes_a_dataset(builtin_service):
    url = builtin_service.url
    archive, manifest, rows = phantom_batch(20, dicom_every=5)
    response = post_batch(url, archive, manifest, **REMOVE_DEVICES)
    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]
    assert response.headers["location"] == f"/batches/{batch_id}"
    status = wait_completed(url, batch_id)

    with_devices = {r["Path"] for r in rows if r["Support Devices"] == 1}
    assert 0 < len(with_devices) < 20
    assert status["total"] == 20 and status["progress"] == 1.0
    assert status["counts"]["skipped"] == 20 - len(with_devices)
    assert status["counts"]["succeeded"] == len(with_devices), status["errors"]
    items = {i["path"]: i for i in status["items"]}
    assert all(
        items[p]["status"] == "skipped" and "changes no condition" in items[p]["reason"]
        for p in items.keys() - with_devices
    )

    data = dataset(url, batch_id)
    expected = {"manifest.csv"}
    jobs = {}
    for path in with_devices:
        job = httpx.get(f"{url}/jobs/{items[path]['job_id']}", timeout=60).json()
        jobs[path] = job["result"]
        expected |= set(dataset_names(path, job["result"]["files"]).values())
    assert set(data.namelist()) == expected
    assert any(name.endswith(".dcm") for name in expected)
    lines = manifest_rows(data)
    assert set(lines) == {r["Path"] for r in rows}
    for path, result in jobs.items():
        line = lines[path]
        assert line["status"] == "succeeded"
        assert float(line["s_clip"]) == pytest.approx(result["s_clip"], abs=1e-9)
        assert line["passed"] == str(result["passed"])
        assert line["edit_prompt"] == result["edit_prompt"] and "Support Devices" not in line["edit_prompt"]
        counterfactual = data.read(line["counterfactual"])
        expected_png = httpx.get(f"{url}/jobs/{items[path]['job_id']}/files/counterfactual.png", timeout=60).content
        assert counterfactual == expected_png

    passed = {p for p, r in jobs.items() if r["passed"]}
    only = dataset(url, batch_id, passed_only="true")
    kept = {name for name in only.namelist() if name.startswith("counterfactuals/") and name.endswith(".png")}
    assert kept == {lines[p]["counterfactual"] for p in passed}
    assert set(manifest_rows(only)) == set(lines)

    listed = httpx.get(f"{url}/batches", timeout=60).json()
    assert batch_id in [b["id"] for b in listed["batches"]]
    metrics = httpx.get(f"{url}/metrics", timeout=60).text
    assert "prism_batches_total" in metrics and 'prism_batch_items_total{outcome="skipped"}' in metrics


def test_a_bad_manifest_is_one_422_naming_every_bad_line(builtin_service):
    url = builtin_service.url
    archive, manifest, rows = phantom_batch(6)
    lines = manifest.decode().splitlines()
    header = lines[0].split(",")
    cells = [line.split(",") for line in lines[1:]]
    cells[0][header.index("Edema")] = "maybe"  # line 2: not a label
    cells[2][0] = "scans/missing.png"  # line 4: no such file
    cells[4][0] = cells[3][0]  # line 6: the image of line 5 again
    bad = "\n".join([lines[0], *(",".join(c) for c in cells)]).encode()
    before = httpx.get(f"{url}/batches", timeout=60).json()["total"]

    response = post_batch(url, archive, bad, **REMOVE_DEVICES)

    assert response.status_code == 422
    located = {tuple(d["loc"][2:]) for d in response.json()["detail"]}
    assert located == {(2, "Edema"), (4, "Path"), (6, "Path")}
    assert httpx.get(f"{url}/batches", timeout=60).json()["total"] == before
    no_path = post_batch(url, archive, b"file,Edema\nscans/p000.png,1\n", **REMOVE_DEVICES)
    assert no_path.status_code == 422 and no_path.json()["detail"][0]["loc"] == ["body", "manifest"]
    broken = post_batch(
        url, zip_of({"scans/p000.png": b"not a png"}), b"Path,Edema\nscans/p000.png,1\n", edit="Edema=0"
    )
    assert broken.status_code == 422 and broken.json()["detail"][0]["loc"] == ["body", "manifest", 2, "Path"]


@pytest.mark.parametrize(
    ("entries", "status", "needle"),
    [
        ({"../x.png": b"x"}, 422, "'../x.png' is not a plain relative file name"),
        ({"/etc/x.png": b"x"}, 422, "not a plain relative file name"),
        ({"scans\\..\\x.png": b"x"}, 422, "not a plain relative file name"),
        ({"bomb.png": bytes(100 * 1024 * 1024)}, 413, "exceeds"),
        ({f"f{i}.png": b"" for i in range(2001)}, 413, "files; the limit is 2000"),
    ],
    ids=["traversal", "absolute", "backslash", "bomb", "entries"],
)
def test_unsafe_archives_are_refused(builtin_service, entries, status, needle):
    manifest = b"Path,Support Devices\nx.png,1\n"
    response = post_batch(builtin_service.url, zip_of(entries), manifest, **REMOVE_DEVICES)
    assert response.status_code == status, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "images"] and needle in detail["msg"]
    not_zip = post_batch(builtin_service.url, png_bytes(xray_like(32, 32)), manifest, **REMOVE_DEVICES)
    assert not_zip.status_code == 422 and "not a ZIP archive" in not_zip.json()["detail"][0]["msg"]


def test_cancel_stops_the_rest_and_a_killed_worker_loses_no_item(tmp_path, tiny_model_dir):
    prompts = b"Path,original_prompt,edit_prompt\n" + b"".join(
        f"scans/p{i:03d}.png,chest x-ray with support devices,chest x-ray without support devices\n".encode()
        for i in range(5)
    )
    archive, _, _ = phantom_batch(5)
    two = b"\n".join(prompts.splitlines()[:3]) + b"\n"
    receiver = Receiver()
    webhooks = {"PRISM_WEBHOOK_ALLOW_PRIVATE": "true", "PRISM_WEBHOOK_SECRET": SECRET}
    with Cluster(tmp_path, tiny_model_dir, workers=1, webhook_sender=True, **webhooks) as c:
        # a worker SIGKILLed while it runs an item: the item is re-queued and every item ends succeeded
        killed = post_batch(c.url, archive, two, steps="30", self_replace_steps="0.5").json()["id"]
        status = wait_for(
            lambda: batch(c.url, killed),
            lambda b: b["counts"]["running"] == 1 and b["counts"]["succeeded"] >= 1,
            "one done",
        )
        running = next(i["job_id"] for i in status["items"] if i["status"] == "running")
        wait_running(c.url, running)
        c.workers[0].send_signal(signal.SIGKILL)
        c.workers[0].wait()
        c.workers[0] = c.add_worker()
        status = wait_completed(c.url, killed)
        assert status["counts"]["succeeded"] == 2, status
        requeues = [httpx.get(f"{c.url}/jobs/{i['job_id']}").json()["requeues"] for i in status["items"]]
        assert sorted(requeues) == [0, 1]
        assert httpx.get(f"{c.url}/jobs/{running}").json()["requeues"] == 1

        # cancel while one item runs and the rest are queued
        canceled = post_batch(
            c.url, archive, prompts, steps="200", self_replace_steps="0.5", webhook=receiver.url
        ).json()["id"]
        wait_for(lambda: batch(c.url, canceled)["counts"]["running"], lambda n: n == 1, "an item running")
        response = httpx.post(f"{c.url}/batches/{canceled}/cancel", timeout=60)
        # 202 while the running item is stopping, 200 if it stopped already (a tiny model's step is short)
        assert response.status_code in (200, 202) and response.json()["counts"]["queued"] == 0
        status = wait_completed(c.url, canceled)
        assert status["counts"]["canceled"] == 5 and status["counts"]["succeeded"] == 0
        again = httpx.post(f"{c.url}/batches/{canceled}/cancel", timeout=60)
        assert again.status_code == 200 and again.json()["counts"]["canceled"] == 5
        wait_for(lambda: len(receiver.requests), lambda n: n >= 1, "batch.completed")
    receiver.close()
    (event,) = receiver.verified()  # the batch's one event; its items send none
    assert event["type"] == "batch.completed"
    assert event["data"]["id"] == canceled
    assert event["data"]["counts"] == {"succeeded": 0, "failed": 0, "canceled": 5, "skipped": 0}
    assert event["data"]["links"]["dataset"] == f"/batches/{canceled}/dataset.zip"
