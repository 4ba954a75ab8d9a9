"""Where a job's data lives, through the real stack: a real-size study leaves kilobytes in Redis
and its files in the blob store; files whose blobs are gone answer 410; a Redis at its memory limit
and a blob store that refuses writes are refusals with their own codes, and nothing accepted is lost."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pydicom
from redis import Redis

from service.contract.blobs import file_blob, input_blob
from tests.api.test_batches import REMOVE_DEVICES, post_batch
from tests.dicom_files import encode, radiograph
from tests.helpers import phantom_batch
from tests.stack import Cluster, blob_dir, poll, submit, wait_ready, wait_running

REDIS_BYTES_PER_JOB = 64 * 1024


def _redis_bytes(redis: Redis, job_id: str) -> int:
    """What Redis holds for one job: every key that names it (record, result, registries' own keys)."""
    return sum(redis.memory_usage(key) or 0 for key in redis.scan_iter(match=f"*{job_id}*", count=1000))


def test_a_real_size_study_leaves_kilobytes_in_redis_and_every_file_is_served(service, redis_server):
    """A 12-bit DICOM DX study of 3000 x 2500 pixels with noise (15 MB): its 8 result files are in
    the blob store, each served as the worker wrote it; Redis keeps the job's record and result."""
    ds, stored = radiograph(3000, 2500, bits_stored=12, seed=11)
    study = encode(ds)
    assert len(study) > 14_000_000 and int(stored.max()) < 4096
    job_id = submit(service.url, study, self_replace_steps="0.4,0.8").json()["id"]
    status = poll(service.url, job_id, {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    redis = Redis.from_url(redis_server.url)
    assert _redis_bytes(redis, job_id) <= REDIS_BYTES_PER_JOB
    blobs = blob_dir(service.env)
    assert not (blobs / input_blob(job_id)).exists()  # the input goes once the job succeeded
    written = 0
    for name, link in status["links"]["files"].items():
        served = httpx.get(f"{service.url}{link}", timeout=120)
        assert served.status_code == 200, name
        assert served.content == (blobs / file_blob(job_id, name)).read_bytes(), name
        assert int(served.headers["content-length"]) == len(served.content)
        written += len(served.content)
    assert len(status["links"]["files"]) == 8
    report = httpx.get(f"{service.url}/jobs/{job_id}/files/report.dcm").content
    assert len(report) < 20_000  # the structured report says what the edit did, with no pixels
    counterfactual = pydicom.dcmread(
        io.BytesIO(httpx.get(f"{service.url}/jobs/{job_id}/files/counterfactual.dcm").content)
    )
    assert counterfactual.pixel_array.shape == (3000, 2500)
    difference = np.load(io.BytesIO(httpx.get(f"{service.url}/jobs/{job_id}/files/difference.npy").content))
    assert difference.shape == (3000, 2500) and difference.dtype == np.float32
    assert written > 30_000_000  # the files are the study's size: none of it went through Redis


def test_files_whose_blobs_are_gone_answer_410(service):
    job_id = submit(service.url).json()["id"]
    assert poll(service.url, job_id, {"succeeded", "failed"})["status"] == "succeeded"
    (blob_dir(service.env) / file_blob(job_id, "difference.npy")).unlink()  # as after the sweep
    gone = httpx.get(f"{service.url}/jobs/{job_id}/files/difference.npy")
    assert gone.status_code == 410 and gone.json()["detail"][0]["type"] == "gone"
    assert "no longer stored" in gone.json()["detail"][0]["msg"]
    assert httpx.get(f"{service.url}/jobs/{job_id}/files/counterfactual.png").status_code == 200
    assert httpx.get(f"{service.url}/jobs/{job_id}/files/nothing.png").status_code == 404


def test_redis_at_its_memory_limit_refuses_new_work_with_503_and_loses_nothing(tmp_path, tiny_model_dir):
    with Cluster(tmp_path, tiny_model_dir, workers=0) as c:
        accepted = submit(c.url).json()["id"]
        redis = Redis.from_url(c.redis.url)
        used = redis.info("memory")["used_memory"]
        redis.config_set("maxmemory", used + 8 * 1024)  # less than one more job
        refused = submit(c.url)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["detail"][0]["type"] == "storage_unavailable"
        assert "storage full" in refused.json()["detail"][0]["msg"]
        archive, manifest, _ = phantom_batch(2)
        batch = post_batch(c.url, archive, manifest, **REMOVE_DEVICES)
        assert batch.status_code == 503 and batch.json()["detail"][0]["type"] == "storage_unavailable"
        assert redis.llen("rq:queue:prism") == 1  # only the job accepted before
        redis.config_set("maxmemory", 0)  # space freed
        after = submit(c.url).json()["id"]
        c.workers.append(c.add_worker())
        wait_ready(c.url)
        assert [poll(c.url, j, {"succeeded", "failed"})["status"] for j in (accepted, after)] == ["succeeded"] * 2
        assert not list((c.blobs / "jobs").glob("*/input"))  # refused requests left no blobs behind


def test_a_worker_that_cannot_store_the_outputs_fails_the_job_with_its_own_code(service):
    job_id = submit(service.url, steps="12").json()["id"]
    wait_running(service.url, job_id)
    blocked = blob_dir(service.env) / "jobs" / job_id / "files"
    blocked.write_bytes(b"")  # a file where the outputs' folder goes: the store refuses them
    final = poll(service.url, job_id, {"succeeded", "failed"})
    assert final["status"] == "failed" and final["error"]["code"] == "storage_unavailable", final
    assert "submit the job again" in final["error"]["message"]
    assert (blob_dir(service.env) / input_blob(job_id)).exists()  # kept for the retry
    blocked.unlink()
    again = submit(service.url).json()["id"]
    assert poll(service.url, again, {"succeeded", "failed"})["status"] == "succeeded"
