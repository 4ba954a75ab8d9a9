"""The blob store on both backends: a real directory, and S3 over HTTP against an S3-protocol
server (moto's) on loopback; and the sweep that takes the blobs of jobs Redis no longer has."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import httpx
import pytest
from redis import Redis

from cli.local_redis import free_port
from models.request.resolve import resolve
from service.contract.blobs import (
    BlobMissing,
    BlobStore,
    StorageUnavailable,
    blob_url,
    file_blob,
    input_blob,
    sweep,
)
from service.contract.jobs import JobRequest, enqueue, job_queue
from service.contract.settings import Settings
from tests.helpers import EDIT, SOURCE
from tests.stack import stop, wait_for


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server as a plain process on a free loopback port, with fake credentials."""
    port = free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(endpoint, timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, bool, "moto_server start", stall_s=60)
        yield endpoint
    finally:
        stop(server)


@pytest.fixture(params=["file", "s3"])
def settings(request, tmp_path, monkeypatch) -> Settings:
    if request.param == "file":
        return Settings(blob_url=(tmp_path / "blobs").as_uri())
    endpoint = request.getfixturevalue("s3_endpoint")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "prism-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "prism-test")
    bucket = f"prism-{uuid.uuid4().hex[:12]}"
    assert httpx.put(f"{endpoint}/{bucket}").status_code == 200  # S3's CreateBucket
    return Settings(blob_url=f"s3://{bucket}/counterfactuals", blob_endpoint=endpoint, blob_region="us-east-1")


def test_blobs_are_written_whole_read_in_pieces_and_deleted(settings):
    blobs = BlobStore.from_settings(settings)
    job_id = uuid.uuid4().hex
    large = bytes(range(256)) * (48 * 1024)  # 12 MiB, sent as a multipart upload in 6 MiB pieces
    blobs.put(input_blob(job_id), large[:1000])
    blobs.put(file_blob(job_id, "difference.npy"), (large[i : i + (6 << 20)] for i in range(0, len(large), 6 << 20)))
    size, chunks = blobs.open(file_blob(job_id, "difference.npy"))
    pieces = list(chunks)
    assert size == len(large) and b"".join(pieces) == large and max(map(len, pieces)) <= 8 << 20
    assert blobs.get(input_blob(job_id)) == large[:1000]
    ((listed, newest, keys),) = [entry for entry in blobs.jobs() if entry[0] == job_id]
    assert sorted(keys) == [file_blob(job_id, "difference.npy"), input_blob(job_id)] and newest.tzinfo
    blobs.delete([input_blob(job_id), input_blob("not-there")])
    assert not blobs.exists(input_blob(job_id)) and blobs.exists(file_blob(job_id, "difference.npy"))
    with pytest.raises(BlobMissing):
        blobs.open(input_blob(job_id))


def test_a_store_that_refuses_raises_storage_unavailable(tmp_path):
    (tmp_path / "a-file").write_bytes(b"")
    refusing = BlobStore.from_settings(Settings(blob_url=tmp_path.as_uri()))
    with pytest.raises(StorageUnavailable):
        refusing.put("a-file/under-a-file", b"x")  # a directory's path through a file: the write fails
    unreachable = BlobStore.from_settings(
        Settings(blob_url="s3://bucket", blob_endpoint=f"http://127.0.0.1:{free_port()}", blob_region="us-east-1")
    )
    with pytest.raises(StorageUnavailable):
        unreachable.get(input_blob("x"))


def test_the_default_store_is_a_directory_under_prism_home(tmp_path):
    settings = Settings(home=str(tmp_path))
    assert blob_url(settings) == (tmp_path / "blobs").as_uri()
    BlobStore.from_settings(settings).put(input_blob("a" * 32), b"x")
    assert (tmp_path / "blobs" / "jobs" / ("a" * 32) / "input").read_bytes() == b"x"


def test_the_sweep_takes_the_blobs_of_jobs_redis_no_longer_has(settings, redis_server):
    """A job's blobs stay while its record does; once the record expired, or for blobs whose job was
    never recorded (the API stopped between the upload and the enqueue), they go after the grace."""
    redis = Redis.from_url(redis_server.url)
    settings = settings.model_copy(update={"redis_url": redis_server.url, "queue_name": f"sweep-{uuid.uuid4().hex}"})
    blobs = BlobStore.from_settings(settings)
    kept, expired, orphan = (uuid.uuid4().hex for _ in range(3))
    request = JobRequest(original_prompt=SOURCE, edit_prompt=EDIT)
    for job_id in (kept, expired):
        enqueue(job_queue(redis, settings), job_id, request, resolve(request), "sweeper", settings)
    for job_id in (kept, expired, orphan):
        blobs.put(input_blob(job_id), b"in")
        blobs.put(file_blob(job_id, "result.json"), b"{}")
    redis.delete(f"rq:job:{expired}")  # its TTL ran out
    assert sweep(redis, blobs, grace_s=3600) == 0  # all are younger than the grace
    assert sweep(redis, blobs, grace_s=0) == 2
    remaining = {job_id for job_id, _, _ in blobs.jobs()}
    assert kept in remaining and not {expired, orphan} & remaining
    assert blobs.get(file_blob(kept, "result.json")) == b"{}"
