"""Bounded load on loopback: 200 jobs, 2 workers, one SIGKILLed mid-run; nothing lost or doubled."""

import collections
import os
import re
import signal

import httpx
import numpy as np
from redis import Redis
from rq import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry

from tests.helpers import png_bytes
from tests.stack import Cluster, wait_for

JOBS = 200


def test_200_jobs_two_workers_one_killed(tmp_path, tiny_model_dir):
    limits = {"PRISM_MAX_QUEUE_DEPTH": "1000", "PRISM_RATE_LIMIT_PER_MINUTE": "1000"}
    with Cluster(tmp_path, tiny_model_dir, workers=2, **limits) as c, httpx.Client(base_url=c.url, timeout=60) as http:
        data = {
            "original_prompt": "chest x-ray of a patient with support devices",
            "edit_prompt": "chest x-ray of a patient without support devices",
            "steps": "1",
            "self_replace_steps": "0.5",
        }
        ids = []
        for i in range(JOBS):
            image = png_bytes(np.random.default_rng(i).random((32, 32)))
            r = http.post("/counterfactual", files={"image": ("x.png", image, "image/png")}, data=data)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])

        queue = Queue("prism", connection=Redis.from_url(c.redis.url))
        registries = FinishedJobRegistry(queue=queue), FailedJobRegistry(queue=queue)
        victim = c.workers[0]

        def ended() -> int:
            """Jobs that ended; kills one worker a third of the way through (the other's heartbeat
            then re-queues the job it was running, to the back of the queue)."""
            count = sum(r.get_job_count(cleanup=False) for r in registries)
            if victim.poll() is None and count >= JOBS // 3:
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait()
            return count

        wait_for(ended, lambda n: n == JOBS, "jobs ending", every_s=1.0)
        assert victim.poll() is not None
        statuses = [http.get(f"/jobs/{j}").json()["status"] for j in ids]

    assert collections.Counter(statuses) == {"succeeded": JOBS}
    done = collections.Counter(re.findall(r"job ([0-9a-f]{32}): done", c.logs()))
    assert set(done) == set(ids)
    assert max(done.values()) == 1, [j for j, n in done.items() if n > 1]
