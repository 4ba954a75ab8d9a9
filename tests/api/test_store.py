"""The API's store reads a job's prompts from what was resolved at submission: status polls and
job lists never resolve findings again."""

import uuid

import pytest
from redis import Redis
from rq.job import JobStatus as RQStatus

import models.request.resolve
from models.request.resolve import resolve
from service.api.store import JobStore
from service.contract.blobs import BlobStore
from service.contract.jobs import JobRequest
from service.contract.settings import Settings
from tests.helpers import png_bytes, xray_like

FINDINGS = {"Support Devices": 1, "Cardiomegaly": 1}


@pytest.fixture
def store(redis_server, tmp_path):
    settings = Settings(redis_url=redis_server.url, queue_name="store-test", blob_url=tmp_path.as_uri())
    redis = Redis.from_url(redis_server.url)
    yield JobStore(redis, settings, BlobStore.from_settings(settings))
    redis.delete("rq:queue:store-test")


def test_status_and_list_show_the_submitted_prompts_after_the_findings_table_changes(store, monkeypatch):
    owner = f"alice-{uuid.uuid4().hex}"  # the session's Redis holds other tests' jobs of other owners named alice
    request = JobRequest(findings=FINDINGS, edit={"Support Devices": 0})
    edit = resolve(request)
    job_id = store.submit(png_bytes(xray_like(16, 16)), request, edit, owner)

    def changed_table(*_):
        raise AssertionError("findings resolved again")

    monkeypatch.setattr(models.request.resolve, "findings_prompts", changed_table)
    monkeypatch.setattr(models.request.resolve, "resolve", changed_table)
    status = store.status(job_id, owner)
    assert status.status == "queued"
    assert status.prompts.original_prompt == "Chest X-ray showing Cardiomegaly, Support Devices"
    assert status.prompts.edit_prompt == "Chest X-ray showing Cardiomegaly"
    listed, total = store.list(owner, limit=10, offset=0)
    assert total == 1 and listed[0].prompts == status.prompts
    assert store.status(job_id, "bob") is None


def test_cancel_of_a_job_a_worker_ended_canceled_meanwhile_answers_its_status(store, monkeypatch):
    """The batch-cancel race: the API reads a job queued, a worker takes it, sees the flag and ends it
    canceled, then the API's cancel of the queued job finds it canceled (RQ raises): not a 500."""
    owner = f"carol-{uuid.uuid4().hex}"
    request = JobRequest(findings=FINDINGS, edit={"Support Devices": 0})
    job_id = store.submit(png_bytes(xray_like(16, 16)), request, resolve(request), owner)
    job = store._fetch(job_id, owner)
    job.cancel()  # what the worker did meanwhile
    real = type(job).get_status
    reads = iter([RQStatus.QUEUED])  # what the API read before the worker took it
    monkeypatch.setattr(type(job), "get_status", lambda self, refresh=True: next(reads, None) or real(self, refresh))
    status = store.cancel(job_id, owner)
    assert status is not None and status.status == "canceled"
