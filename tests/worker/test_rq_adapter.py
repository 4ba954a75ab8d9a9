"""Each hook of ``worker.rq_adapter`` against the pinned RQ and a real redis-server: an RQ upgrade
that renames or changes one of the internals it uses fails here."""

from __future__ import annotations

import time
import uuid

import pytest
from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from worker import rq_adapter


@pytest.fixture
def rq(redis_server):
    redis = Redis.from_url(redis_server.url)
    queue = Queue(f"adapter-{uuid.uuid4().hex}", connection=redis, serializer=JSONSerializer)
    worker = SimpleWorker([queue], connection=redis, serializer=JSONSerializer, name=f"adapter-{uuid.uuid4().hex}")
    worker.register_birth()
    yield redis, queue, worker
    worker.register_death()


def _dequeued(queue: Queue, count: int):
    """``count`` jobs as RQ's dequeue leaves them: in the queue's intermediate list."""
    jobs = [queue.enqueue_call("json.dumps", args=(n,), timeout=60) for n in range(count)]
    for _ in jobs:
        queue.connection.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")
    return jobs


def test_take_marks_every_job_started_under_the_worker_and_out_of_the_intermediate_list(rq):
    redis, queue, worker = rq
    jobs = _dequeued(queue, 2)
    executions = rq_adapter.take(worker, jobs)
    assert set(executions) == {job.id for job in jobs}
    assert redis.llen(queue.intermediate_queue_key) == 0
    started = StartedJobRegistry(queue=queue).get_job_ids(cleanup=False)
    for job in jobs:
        job.refresh()
        assert job.get_status() == JobStatus.STARTED and job.worker_name == worker.name and job.id in started
        assert job.started_at is not None


def test_finish_ends_a_job_as_rq_ends_one_it_performed(rq):
    redis, queue, worker = rq
    done, broken = _dequeued(queue, 2)
    executions = rq_adapter.take(worker, [done, broken])
    rq_adapter.finish(worker, done, queue, executions[done.id], {"s_clip": 0.5})
    rq_adapter.finish(worker, broken, queue, executions[broken.id], ValueError("no"))
    assert done.id in FinishedJobRegistry(queue=queue).get_job_ids(cleanup=False)
    assert queue.fetch_job(done.id).return_value() == {"s_clip": 0.5}
    assert broken.id in FailedJobRegistry(queue=queue).get_job_ids(cleanup=False)
    assert queue.fetch_job(broken.id).get_status() == JobStatus.FAILED
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []


def test_a_stopped_job_ends_stopped_and_its_result_is_readable(rq):
    redis, queue, worker = rq
    (job,) = _dequeued(queue, 1)
    executions = rq_adapter.take(worker, [job])
    rq_adapter.mark_stopped(worker, job.id)
    assert rq_adapter.is_stopped(worker, job.id) and not rq_adapter.is_stopped(worker, "other")
    rq_adapter.finish(worker, job, queue, executions[job.id], RuntimeError("canceled"))
    assert queue.fetch_job(job.id).get_status() == JobStatus.STOPPED
    job._result = {"kept": True}
    assert rq_adapter.result(job) == {"kept": True}


def test_give_back_puts_a_held_job_first_in_the_queue_untouched(rq):
    redis, queue, worker = rq
    (held,) = _dequeued(queue, 1)
    other = queue.enqueue_call("json.dumps", args=(9,))
    held.meta["lost"] = 0
    held.save_meta()
    executions = rq_adapter.take(worker, [held])
    rq_adapter.give_back(worker, held, queue, executions[held.id])
    assert queue.get_job_ids() == [held.id, other.id]
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []
    back = queue.fetch_job(held.id)
    assert back.get_status() == JobStatus.QUEUED and back.meta["lost"] == 0


def test_the_time_limit_is_rqs_timer(rq):
    _, _, worker = rq
    with pytest.raises(JobTimeoutException), rq_adapter.time_limit(worker, 1, "job"):
        time.sleep(5)
