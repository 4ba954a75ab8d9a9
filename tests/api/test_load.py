"""Bounded load on loopback: 200 jobs, 2 workers, one SIGKILLed inside a job; nothing lost or doubled."""

import collections
import os
import re
import signal
import subprocess

import httpx
import numpy as np
from redis import Redis
from rq import Queue, Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from service.contract.jobs import read_progress
from tests.helpers import png_bytes
from tests.stack import Cluster, wait_for

JOBS = 200
ENGINE_PHASES = ("inversion", "editing")
"""Phases a job is in before its outputs are written: a worker killed there has not finished it."""


def engine_job(queue: Queue, pid: int) -> str | None:
    """The job the worker with ``pid`` is inside the engine with, read while that worker is stopped."""
    worker = next((w for w in Worker.all(queue=queue) if w.pid == pid), None)
    job_id = worker.get_current_job_id() if worker else None
    if job_id is None:
        return None
    job = Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
    return job_id if read_progress(job).phase in ENGINE_PHASES else None


def kill_inside_a_job(victim: subprocess.Popen, queue: Queue) -> str | None:
    """SIGKILL ``victim`` if it is inside the engine with a job, and return that job's id.

    The worker is stopped (SIGSTOP) while its state is read, so the state cannot move on between
    the check and the kill; otherwise it is let go again.
    """
    os.kill(victim.pid, signal.SIGSTOP)
    job_id = engine_job(queue, victim.pid)
    os.kill(victim.pid, signal.SIGKILL if job_id else signal.SIGCONT)
    if job_id:
        victim.wait()
    return job_id


def test_200_jobs_two_workers_one_killed(tmp_path, tiny_model_dir):
    limits = {"PRISM_MAX_QUEUE_DEPTH": "1000", "PRISM_RATE_LIMIT_PER_MINUTE": "1000"}
    with Cluster(tmp_path, tiny_model_dir, workers=2, **limits) as c, httpx.Client(base_url=c.url, timeout=60) as http:
        data = {
            "original_prompt": "chest x-ray of a patient with support devices",
            "edit_prompt": "chest x-ray of a patient without support devices",
            "steps": "1",
            "self_replace_steps": "0.5",
            "inversion": "negative_prompt",
        }
        ids = []
        for i in range(JOBS):
            image = png_bytes(np.random.default_rng(i).random((32, 32)))
            r = http.post("/counterfactual", files={"image": ("x.png", image, "image/png")}, data=data)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])

        queue = Queue("prism", connection=Redis.from_url(c.redis.url))
        registries = FinishedJobRegistry(queue=queue), FailedJobRegistry(queue=queue)
        victim, killed = c.workers[0], []

        def ended() -> int:
            """Jobs that ended; a third of the way through, kills one worker inside a job (the
            other's heartbeat then re-queues that job, to the back of the queue)."""
            count = sum(r.get_job_count(cleanup=False) for r in registries)
            if not killed and count >= JOBS // 3 and (job_id := kill_inside_a_job(victim, queue)):
                killed.append(job_id)
            return count

        wait_for(ended, lambda n: n == JOBS, "jobs ending", every_s=0.2)
        statuses = [http.get(f"/jobs/{j}").json()["status"] for j in ids]

    assert len(killed) == 1 and victim.poll() == -signal.SIGKILL
    assert re.search(rf"job {killed[0]}: worker \S+ lost; re-queued", c.logs())
    assert collections.Counter(statuses) == {"succeeded": JOBS}
    done = collections.Counter(re.findall(r"job ([0-9a-f]{32}): done", c.logs()))
    assert set(done) == set(ids)
    assert max(done.values()) == 1, [j for j, n in done.items() if n > 1]
