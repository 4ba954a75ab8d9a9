"""Bounded load on loopback: 200 jobs, 2 workers, one SIGKILLed mid-run; nothing lost or doubled."""

import collections
import os
import re
import signal

import httpx
import numpy as np

from tests.helpers import png_bytes
from tests.stack import Cluster, wait_for

JOBS = 200
FINAL = ("succeeded", "failed", "canceled")


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

        statuses: dict[str, str] = {}
        victim = c.workers[0]

        def finished() -> int:
            for j in ids:
                if j not in statuses:
                    s = http.get(f"/jobs/{j}").json()["status"]
                    if s in FINAL:
                        statuses[j] = s
                    elif s == "queued":
                        break  # jobs run in order: the rest are queued too
            if victim.poll() is None and len(statuses) >= JOBS // 3:
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait()
            return len(statuses)

        wait_for(finished, lambda n: n == JOBS, "jobs finishing", every_s=1.0)
        assert victim.poll() is not None

    assert collections.Counter(statuses.values()) == {"succeeded": JOBS}
    done = collections.Counter(re.findall(r"job ([0-9a-f]{32}): done", c.logs()))
    assert set(done) == set(ids)
    assert max(done.values()) == 1, [j for j, n in done.items() if n > 1]
