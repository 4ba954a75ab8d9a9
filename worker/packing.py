"""Which queued jobs a packing worker takes beside the one RQ gave it, and how it takes them.

A worker with ``PRISM_WORKER_PACK`` N > 1 that dequeues a job looks at the jobs queued behind it
and takes, in queue order, up to N - 1 whose edits share its :func:`~models.pipeline.pack_key`
(PRISM's method, the same inversion mode, steps, guidance and null-text settings). It does not
wait for more: a lone job runs at once. Each is moved from the queue to RQ's intermediate queue
in one Redis script, as RQ's own dequeue moves the first, so no other worker can take it too;
the worker then marks each started under its own name, from where the recovery sweep re-queues
them all should the worker die.
"""

from __future__ import annotations

from collections.abc import Hashable

from pydantic import ValidationError
from redis import Redis
from rq import Queue
from rq.job import Job

from models.pipeline import pack_key
from service.contract.jobs import TASK, cancel_flags, fetch_many, job_edit

LOOKAHEAD = 8
"""Queued jobs looked at per free place in the pack."""

CLAIM = """
local taken = {}
for _, id in ipairs(ARGV) do
  if redis.call('LREM', KEYS[1], 1, id) == 1 then
    redis.call('RPUSH', KEYS[2], id)
    table.insert(taken, id)
  end
end
return taken
"""


def job_pack_key(job: Job) -> Hashable | None:
    """The key of the job's edit; None (it runs alone) for a job of another task or a malformed one."""
    if job.func_name != TASK:
        return None
    try:
        return pack_key(job_edit(job).params)
    except (ValidationError, KeyError, TypeError):
        return None


def claim_companions(redis: Redis, queue: Queue, leader: Job, places: int) -> list[Job]:
    """Up to ``places`` queued jobs that can share ``leader``'s pack, taken off the queue."""
    if places < 1 or (key := job_pack_key(leader)) is None:
        return []
    ids = [raw.decode() for raw in redis.lrange(queue.key, 0, LOOKAHEAD * places - 1)]
    candidates = [job for job in fetch_many(redis, ids) if job is not None and job_pack_key(job) == key]
    with redis.pipeline(transaction=False) as pipe:
        for job in candidates:
            pipe.exists(*cancel_flags(job))
        flagged = pipe.execute()
    candidates = [job for job, canceled in zip(candidates, flagged, strict=True) if not canceled]
    wanted = [job.id for job in candidates[:places]]
    if not wanted:
        return []
    claim = redis.register_script(CLAIM)
    taken = {raw.decode() for raw in claim(keys=[queue.key, queue.intermediate_queue_key], args=wanted)}
    return [job for job in candidates if job.id in taken]
