"""A worker that dies or overruns: the job is re-queued, fails with its code, the worker survives."""

import os
import signal

from redis import Redis

from service.contract.blobs import input_blob
from tests.stack import Cluster, job_state, poll, submit, wait_for, wait_running


def _worker_pid(cluster: Cluster, job_id: str) -> int:
    name = Redis.from_url(cluster.redis.url).hget(f"rq:job:{job_id}", "worker_name").decode()
    return int(name.split(".")[-2])


def test_killed_worker_job_is_requeued_to_another_worker(tmp_path, tiny_model_dir):
    with Cluster(tmp_path, tiny_model_dir, workers=2) as c:
        job_id = submit(c.url, steps="12", self_replace_steps="0.4,0.8").json()["id"]
        wait_running(c.url, job_id)
        os.kill(_worker_pid(c, job_id), signal.SIGKILL)
        wait_for(lambda: job_state(c.url, job_id)["requeues"], lambda n: n > 0, "re-queue after SIGKILL")
        final = poll(c.url, job_id, {"succeeded", "failed"})
        assert final["status"] == "succeeded" and final["requeues"] == 1, final
        assert c.logs().count(f"job {job_id}: done") == 1
        assert c.logs().count(f"job {job_id}: started") == 2


def test_killed_worker_without_retries_fails_with_worker_lost(tmp_path, tiny_model_dir):
    with Cluster(tmp_path, tiny_model_dir, workers=1, PRISM_MAX_REQUEUES="0") as c:
        job_id = submit(c.url, steps="12").json()["id"]
        wait_running(c.url, job_id)
        os.kill(_worker_pid(c, job_id), signal.SIGKILL)
        final = poll(c.url, job_id, {"succeeded", "failed"})
        assert final["status"] == "failed"
        assert final["error"] == {
            "code": "worker_lost",
            "message": "the worker running this job stopped; retries exhausted",
        }


def test_timeout_fails_job_and_worker_survives(tmp_path, tiny_model_dir):
    with Cluster(tmp_path, tiny_model_dir, workers=1, PRISM_JOB_TIMEOUT_S="6") as c:
        slow = submit(c.url, steps="999").json()["id"]
        final = poll(c.url, slow, {"succeeded", "failed"})
        assert final["status"] == "failed" and final["error"]["code"] == "timeout", final
        quick = submit(c.url, steps="1").json()["id"]
        assert poll(c.url, quick, {"succeeded", "failed"})["status"] == "succeeded"
        assert all(w.poll() is None for w in c.workers)
        assert "Traceback" not in c.logs()


def test_expired_input_fails_with_its_code(tmp_path, tiny_model_dir):
    with Cluster(tmp_path, tiny_model_dir, workers=0) as c:
        job_id = submit(c.url).json()["id"]
        (c.blobs / input_blob(job_id)).unlink()
        c.workers.append(c.add_worker())
        final = poll(c.url, job_id, {"succeeded", "failed"})
        assert final["status"] == "failed" and final["error"]["code"] == "input_expired", final
        assert final["result"] is None and final["links"]["files"] == {}


def test_sigterm_finishes_the_current_job_then_exits(tmp_path, tiny_model_dir):
    """What a Kubernetes scale-in or rollout sends: the job in hand completes, the worker exits 0
    and takes no other job (deploy/k8s gives it PRISM_JOB_TIMEOUT_S plus a minute to do so)."""
    with Cluster(tmp_path, tiny_model_dir, workers=1) as c:
        running = submit(c.url, steps="12", self_replace_steps="0.4,0.8").json()["id"]
        wait_running(c.url, running)
        waiting = submit(c.url, steps="2").json()["id"]
        c.workers[0].send_signal(signal.SIGTERM)
        assert c.workers[0].wait(600) == 0
        assert job_state(c.url, running)["status"] == "succeeded"
        assert job_state(c.url, waiting)["status"] == "queued"  # left for the next worker
        assert "Traceback" not in c.logs()
