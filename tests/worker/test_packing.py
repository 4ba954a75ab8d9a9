"""A packing worker (PRISM_WORKER_PACK): which queued jobs it takes, and RQ's life of a job kept
for each job of a pack (own progress, cancel, failure, result, re-queue after a lost worker)."""

import os
import signal

import httpx
from redis import Redis

from models.request.params import EditParams
from models.request.resolve import ResolvedEdit
from service.contract.blobs import input_blob
from service.contract.jobs import JobRequest, enqueue, job_queue
from service.contract.settings import Settings
from tests.helpers import EDIT, SOURCE
from tests.stack import Cluster, job_state, poll, submit, wait_for, wait_running
from worker.packing import claim_companions


def test_it_takes_the_queued_jobs_that_share_the_pack_key_in_queue_order(redis_server):
    settings = Settings(redis_url=redis_server.url, queue_name="claim-test")
    redis = Redis.from_url(redis_server.url)
    queue = job_queue(redis, settings)
    params = {
        "leader": EditParams(steps=4),
        "same": EditParams(steps=4, self_replace_steps=(0.3,), output="decoded"),
        "sdedit": EditParams(steps=4, method="sdedit"),
        "other steps": EditParams(steps=5),
        "other inversion": EditParams(steps=4, inversion="negative_prompt"),
        "same too": EditParams(steps=4, blend_threshold=0.6),
        "same again": EditParams(steps=4),
    }
    jobs = {
        name: enqueue(
            queue,
            name.replace(" ", "-"),
            JobRequest(),
            ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=p),
            "o",
            settings,
        )
        for name, p in params.items()
    }
    try:
        leader = queue.dequeue_any([queue], None, connection=redis, serializer=queue.serializer)[0]
        taken = claim_companions(redis, queue, leader, places=2)
        assert [job.id for job in taken] == ["same", "same-too"]
        assert queue.get_job_ids() == ["sdedit", "other-steps", "other-inversion", "same-again"]
        assert [raw.decode() for raw in redis.lrange(queue.intermediate_queue_key, 0, -1)] == [
            "leader",
            "same",
            "same-too",
        ]
        assert claim_companions(redis, queue, jobs["sdedit"], places=3) == []  # sdedit runs alone
    finally:
        redis.delete(queue.key, queue.intermediate_queue_key, *(job.key for job in jobs.values()))


def test_a_canceled_and_a_failing_job_leave_the_pack_and_the_others_succeed(tmp_path, tiny_model_dir):
    with Cluster(tmp_path, tiny_model_dir, workers=0, PRISM_WORKER_PACK="4") as c:
        ids = [submit(c.url, steps="24", self_replace_steps="0.4,0.8").json()["id"] for _ in range(4)]
        first, canceled, expired, last = ids
        (c.blobs / input_blob(expired)).unlink()
        c.workers.append(c.add_worker())
        wait_running(c.url, canceled)
        assert all(job_state(c.url, i)["status"] in ("running", "failed") for i in ids)  # all taken at once
        assert httpx.post(f"{c.url}/jobs/{canceled}/cancel", timeout=30).status_code == 202
        assert poll(c.url, canceled, {"canceled", "succeeded", "failed"})["status"] == "canceled"
        assert job_state(c.url, first)["status"] == "running"  # the others go on
        results = [poll(c.url, i, {"succeeded", "failed", "canceled"}) for i in (first, last)]
        assert [r["status"] for r in results] == ["succeeded", "succeeded"]
        assert [r["result"]["pack_size"] for r in results] == [3, 3]  # the expired one never started
        failed = job_state(c.url, expired)
        assert failed["status"] == "failed" and failed["error"]["code"] == "input_expired"
        assert "pack of 4 jobs" in c.logs() and "Traceback" not in c.logs()
        for i in (first, last):
            files = job_state(c.url, i)["links"]["files"]
            assert set(files) >= {"counterfactual.png", "result.json"}


def test_a_worker_killed_mid_pack_has_every_job_requeued_and_run_once(tmp_path, tiny_model_dir):
    with Cluster(tmp_path, tiny_model_dir, workers=0, PRISM_WORKER_PACK="3") as c:
        ids = [submit(c.url, steps="16", self_replace_steps="0.4,0.8").json()["id"] for _ in range(3)]
        c.workers.append(c.add_worker())
        for job_id in ids:
            wait_running(c.url, job_id)
        name = Redis.from_url(c.redis.url).hget(f"rq:job:{ids[0]}", "worker_name").decode()
        os.kill(int(name.split(".")[-2]), signal.SIGKILL)
        for job_id in ids:
            wait_for(lambda j=job_id: job_state(c.url, j)["requeues"], lambda n: n > 0, "re-queue after SIGKILL")
        c.workers.append(c.add_worker())
        finals = [poll(c.url, job_id, {"succeeded", "failed"}) for job_id in ids]
        assert [(f["status"], f["requeues"]) for f in finals] == [("succeeded", 1)] * 3
        for job_id in ids:
            assert c.logs().count(f"job {job_id}: done") == 1
