"""``POST /batches`` before any worker runs: idempotency, the queue's room, the row limit, other
tenants, the archive checks on entries a ZIP writer would not make, and entry names read as
archivers write them."""

import io
import stat
import unicodedata
import uuid
import zipfile

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.api.app import create_app
from service.api.archive import ArchiveLimits, open_archive
from service.api.uploads import UploadRejected
from service.contract.jobs import fetch_job, job_edit
from service.contract.settings import Settings
from service.contract.tenants import add_tenant
from tests.helpers import phantom_batch

EDIT = {"edit": "Support Devices=0", "steps": "3"}


@pytest.fixture
def client(redis_server):
    queue = f"batch-test-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_server.url, auth="off", queue_name=queue, max_queue_depth=6, batch_max_items=8)
    with TestClient(create_app(settings)) as c:
        yield c
    Redis.from_url(redis_server.url).delete(f"rq:queue:{queue}")


def post(client, archive, manifest, headers=None, **fields):
    files = {"images": ("b.zip", archive), "manifest": ("m.csv", manifest)}
    return client.post("/batches", files=files, data={**EDIT, **fields}, headers=headers or {})


def test_an_idempotency_key_gives_the_same_batch_and_refuses_other_content(client):
    archive, manifest, _ = phantom_batch(4)
    before = client.get("/batches").json()["total"]  # one Redis serves the session's tests
    first = post(client, archive, manifest, {"Idempotency-Key": "k1"})
    again = post(client, archive, manifest, {"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = post(client, archive, manifest, {"Idempotency-Key": "k1"}, steps="4")
    assert other.status_code == 409
    assert client.get("/batches").json()["total"] == before + 1


def test_a_batch_that_does_not_fit_the_queue_is_refused_whole(client):
    archive, manifest, rows = phantom_batch(8)
    applicable = sum(1 for r in rows if r["Support Devices"] == 1)
    assert applicable <= 6
    before = client.get("/batches").json()["total"]
    assert post(client, archive, manifest).status_code == 202
    refused = post(client, archive, manifest)
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert f"room for {6 - applicable} jobs" in refused.json()["detail"][0]["msg"]
    assert client.get("/batches").json()["total"] == before + 1
    assert client.get("/scaling").json()["queued"] == applicable


def test_more_rows_than_the_limit_is_413_and_findings_are_the_manifests(client):
    archive, manifest, _ = phantom_batch(9)
    too_many = post(client, archive, manifest)
    assert too_many.status_code == 413 and "limit is 8" in too_many.json()["detail"][0]["msg"]
    findings = post(client, archive, manifest, findings="Edema=1")
    assert findings.status_code == 422 and findings.json()["detail"][0]["loc"] == ["body", "findings"]


def test_a_batch_s_outputs_reach_its_jobs(client, redis_server):
    archive, manifest, _ = phantom_batch(4)
    accepted = post(client, archive, manifest, outputs=["counterfactual.png", "result.json"])  # repeated parts
    assert accepted.status_code == 202, accepted.text
    items = client.get(f"/batches/{accepted.json()['id']}").json()["items"]
    redis = Redis.from_url(redis_server.url)
    outputs = [job_edit(fetch_job(redis, item["job_id"])).params.outputs for item in items if item["job_id"]]
    assert outputs and set(outputs) == {("counterfactual.png", "result.json")}


def test_another_tenants_batch_is_not_found(client):
    assert client.get(f"/batches/{uuid.uuid4().hex}").status_code == 404
    assert client.get("/batches/not-an-id/dataset.zip").status_code == 404
    assert client.post(f"/batches/{uuid.uuid4().hex}/cancel").status_code == 404


def _zip(*infos: tuple[zipfile.ZipInfo, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for info, data in infos:
            z.writestr(info, data)
    buffer.seek(0)
    return buffer


LIMITS = ArchiveLimits(max_entries=10, max_entry_bytes=1000, max_total_bytes=1500)


def test_links_duplicates_and_lying_sizes_are_refused():
    link = zipfile.ZipInfo("scans/a.png")
    link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(UploadRejected, match="link") as refused:
        open_archive(_zip((link, b"/etc/passwd")), LIMITS)
    assert refused.value.status_code == 422 and refused.value.field == "images"

    with pytest.warns(UserWarning, match="Duplicate name"):
        twice = _zip((zipfile.ZipInfo("a.png"), b"1"), (zipfile.ZipInfo("a.png"), b"2"))
    with pytest.raises(UploadRejected, match="appears twice"):
        open_archive(twice, LIMITS)

    archive = open_archive(_zip((zipfile.ZipInfo("a.png"), b"x" * 900)), LIMITS)
    assert archive.read("a.png") == b"x" * 900
    with pytest.raises(UploadRejected, match="more than 1500 bytes") as over:
        archive.read("a.png")  # what is read is summed as it is read, not only as declared
    assert over.value.status_code == 413

    # an entry whose header declares fewer bytes than it holds is cut at its declared size and fails its CRC
    lying = _zip((zipfile.ZipInfo("a.png"), b"z" * 900))
    raw = bytearray(lying.getvalue())
    raw[raw.rindex(b"PK\x01\x02") + 24 : raw.rindex(b"PK\x01\x02") + 28] = (10).to_bytes(4, "little")
    archive = open_archive(io.BytesIO(bytes(raw)), LIMITS)
    with pytest.raises(UploadRejected, match="cannot be decompressed"):
        archive.read("a.png")


def test_batches_belong_to_the_key_that_made_them(redis_server, tmp_path):
    keys = tmp_path / "keys"
    alice, _ = add_tenant(keys, "alice")
    bob, _ = add_tenant(keys, "bob")
    queue = f"batch-keys-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_server.url, auth="on", api_keys_file=str(keys), queue_name=queue)
    archive, manifest, _ = phantom_batch(3)
    with TestClient(create_app(settings)) as client:
        assert post(client, archive, manifest).status_code == 401
        batch_id = post(client, archive, manifest, {"X-API-Key": alice}).json()["id"]
        for path in (f"/batches/{batch_id}", f"/batches/{batch_id}/dataset.zip"):
            assert client.get(path, headers={"X-API-Key": bob}).status_code == 404
            assert client.get(path, headers={"X-API-Key": alice}).status_code == 200
        assert client.post(f"/batches/{batch_id}/cancel", headers={"X-API-Key": bob}).status_code == 404
        assert client.get("/batches", headers={"X-API-Key": bob}).json()["total"] == 0
        assert client.get("/batches", headers={"X-API-Key": alice}).json()["batches"][0]["id"] == batch_id
    Redis.from_url(redis_server.url).delete(f"rq:queue:{queue}")


def _unflagged(name: str, data: bytes) -> io.BytesIO:
    """A ZIP whose one entry's name is UTF-8 without the UTF-8 flag, as macOS's archiver writes it."""
    raw = name.encode()
    placeholder = b"x" * len(raw)
    buffer = _zip((zipfile.ZipInfo(placeholder.decode()), data))
    return io.BytesIO(buffer.getvalue().replace(placeholder, raw))


def test_entry_names_follow_the_manifest_rule_as_archivers_write_them():
    decomposed = unicodedata.normalize("NFD", "scans/échographie.png")
    archive = open_archive(_unflagged(decomposed, b"x"), LIMITS)
    assert archive.zip.infolist()[0].flag_bits & 0x800 == 0
    assert archive.find("scans/échographie.png") == "scans/échographie.png"
    windows = open_archive(
        _zip((zipfile.ZipInfo("scans\\p000.png"), b"x"), (zipfile.ZipInfo("./p001.png"), b"y")), LIMITS
    )
    assert set(windows.files) == {"scans/p000.png", "p001.png"}
    assert windows.find("CheXpert-v1.0/scans/p000.png") == "scans/p000.png"
    with pytest.raises(UploadRejected, match="control character") as refused:
        open_archive(_zip((zipfile.ZipInfo("scans/a\x01.png"), b"x")), LIMITS)
    assert refused.value.status_code == 422 and refused.value.field == "images"
    composed = zipfile.ZipInfo("scans/échographie.png")
    with pytest.raises(UploadRejected, match="appears twice"):
        open_archive(_zip((composed, b"x"), (zipfile.ZipInfo(decomposed), b"y")), LIMITS)
