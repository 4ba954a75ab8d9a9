"""A batch's accounting: each job counted once whoever ends it, ``batch.completed`` queued once
after the last, and the dataset layout both sides write."""

import uuid
from datetime import UTC, datetime

from redis import Redis

from models.request.resolve import resolve
from service.api.store import JobStore
from service.contract.batches import BatchItem, BatchRecord, ended_counts, job_ended, save_batch
from service.contract.blobs import BlobStore
from service.contract.datasets import ManifestLine, dataset_names, manifest_csv, read_manifest_csv
from service.contract.jobs import JobRequest, fetch_job
from service.contract.settings import Settings
from service.contract.webhooks import webhook_queue
from tests.helpers import EDIT, SOURCE, png_bytes, xray_like


def test_each_job_is_counted_once_and_the_batch_completes_once(redis_server, tmp_path):
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        redis_url=redis_server.url, queue_name=f"q-{tag}", webhook_queue_name=f"w-{tag}", blob_url=tmp_path.as_uri()
    )
    redis = Redis.from_url(redis_server.url)
    store = JobStore(redis, settings, BlobStore.from_settings(settings))
    request = JobRequest(original_prompt=SOURCE, edit_prompt=EDIT)
    batch_id, ids = uuid.uuid4().hex, [uuid.uuid4().hex for _ in range(2)]
    for job_id in ids:
        store.add(job_id, png_bytes(xray_like(16, 16)), request, resolve(request), "alice", batch=batch_id)
    items = [BatchItem(line=2 + n, path=f"{n}.png", job_id=j) for n, j in enumerate(ids)]
    items.append(BatchItem(line=4, path="skip.png", skipped="nothing to edit"))
    record = BatchRecord(
        id=batch_id, owner="alice", created_at=datetime.now(UTC), items=items, webhook="https://example.org/h"
    )
    save_batch(redis, settings, record)
    first, second = (fetch_job(redis, j) for j in ids)

    job_ended(redis, settings, first, {"status": "canceled"})
    job_ended(redis, settings, first, {"status": "failed"})  # a second report of the same job is not counted
    assert ended_counts(redis, batch_id) == {"succeeded": 0, "failed": 0, "canceled": 1}
    assert webhook_queue(redis, settings).count == 0

    job_ended(redis, settings, second, {"status": "succeeded"})
    job_ended(redis, settings, second, {"status": "succeeded"})
    assert ended_counts(redis, batch_id) == {"succeeded": 1, "failed": 0, "canceled": 1}
    (delivery,) = webhook_queue(redis, settings).get_jobs()
    event = delivery.kwargs["event"]
    assert event["type"] == "batch.completed" and delivery.kwargs["url"] == "https://example.org/h"
    assert event["data"]["counts"] == {"succeeded": 1, "failed": 0, "canceled": 1, "skipped": 1}


def test_the_layout_keeps_folders_and_the_manifest_reads_back():
    names = dataset_names(
        "CheXpert/p1/study1/view1.dcm", ["counterfactual.png", "counterfactual.dcm", "reconstruction.png"]
    )
    assert names == {
        "counterfactual.png": "counterfactuals/CheXpert/p1/study1/view1.png",
        "counterfactual.dcm": "counterfactuals/CheXpert/p1/study1/view1.dcm",
    }
    lines = [
        ManifestLine(line=2, path="a.png", status="succeeded", s_clip=0.25, passed=True, original_prompt='a, "b"'),
        ManifestLine(line=3, path="b.png", status="skipped", reason="nothing, to edit"),
    ]
    assert read_manifest_csv(manifest_csv(lines)) == lines
