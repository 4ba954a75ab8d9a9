"""A worker's life against real processes: Redis gone for longer than a heartbeat in the middle
of a pass, and a large batch canceled while a worker holds some of it. Every accepted job ends
exactly once, the worker process never exits, and the counts agree."""

from __future__ import annotations

import csv
import io
import time

import httpx
from redis import Redis
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry

from tests.api.test_batches import post_batch
from tests.helpers import phantom_batch
from tests.stack import Cluster, job_state, poll, ready_workers, submit, wait_for, wait_ready, wait_running


def _ended(redis: Redis) -> dict[str, list[str]]:
    """The job ids in each registry of ended jobs."""
    registries = {"succeeded": FinishedJobRegistry, "failed": FailedJobRegistry, "canceled": CanceledJobRegistry}
    return {
        state: registry("prism", connection=redis).get_job_ids(cleanup=False) for state, registry in registries.items()
    }


def test_redis_gone_mid_pass_ends_every_job_once_and_the_worker_stays(tmp_path, tiny_model_dir):
    with Cluster(tmp_path, tiny_model_dir, workers=1, PRISM_WORKER_PACK="2") as c:
        ids = [submit(c.url, steps="12").json()["id"] for _ in range(4)]
        wait_running(c.url, ids[0])
        c.redis.stop()
        time.sleep(5)  # more than 3 heartbeats of 1 s: the worker looks lost to whoever asks
        c.redis.start()
        finals = [poll(c.url, job_id, {"succeeded", "failed", "canceled"}) for job_id in ids]
        assert [f["status"] for f in finals] == ["succeeded"] * 4, finals
        ended = _ended(Redis.from_url(c.redis.url))
        assert sorted(ended["succeeded"]) == sorted(ids) and ended["failed"] == ended["canceled"] == []
        assert c.workers[0].poll() is None
        wait_ready(c.url)  # /readyz counts the worker again, by itself
        logs = c.logs()
        assert logs.count("lost Redis; waiting for it") == 1 and logs.count("Redis is back after") == 1
        assert "Traceback" not in logs


def test_a_canceled_batch_ends_every_item_canceled_while_a_worker_holds_some(tmp_path, tiny_model_dir):
    """300 items on a worker taking 4 at a time: the cancel reaches the running ones, the queued
    ones and those a worker takes meanwhile; none fails for its deleted input; the metrics agree."""
    with Cluster(tmp_path, tiny_model_dir, workers=1, PRISM_WORKER_PACK="4", PRISM_MAX_QUEUE_DEPTH="400",
                 PRISM_BATCH_MAX_ITEMS="300") as c:  # fmt: skip
        archive, _, rows = phantom_batch(300)
        table = io.StringIO()
        writer = csv.DictWriter(table, [*rows[0], "edit"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "edit": f"Support Devices={1 - r['Support Devices']}"} for r in rows)  # none skipped
        response = post_batch(c.url, archive, table.getvalue().encode(), steps="30", self_replace_steps="0.5")
        assert response.status_code == 202, response.text
        batch_id = response.json()["id"]
        items = httpx.get(f"{c.url}/batches/{batch_id}", timeout=60).json()["items"]
        wait_running(c.url, next(item["job_id"] for item in items if item["job_id"]))
        assert httpx.post(f"{c.url}/batches/{batch_id}/cancel", timeout=300).status_code in (200, 202)

        def counts() -> dict:
            return httpx.get(f"{c.url}/batches/{batch_id}", timeout=60).json()["counts"]

        final = wait_for(counts, lambda n: n["queued"] == n["running"] == 0, "every item ended")
        assert final["canceled"] == 300 and final["failed"] == final["succeeded"] == 0, final
        ended = _ended(Redis.from_url(c.redis.url))
        assert len(ended["canceled"]) == 300 and ended["failed"] == []
        metrics = httpx.get(f"{c.url}/metrics", timeout=60).text
        assert 'prism_jobs{status="canceled"} 300.0' in metrics and 'prism_jobs{status="failed"} 0.0' in metrics
        assert 'prism_batch_items_total{outcome="canceled"} 300.0' in metrics
        assert ready_workers(c.url) == 1 and job_state(c.url, items[0]["job_id"])["status"] == "canceled"
