"""The job contract: what a job carries, how its failure and progress are recorded and read back."""

import subprocess
import sys

import pytest
from pydantic import ValidationError
from redis import Redis

from models.request.params import EditOptions, EditParams
from models.request.resolve import resolve
from service.contract.blobs import input_blob
from service.contract.jobs import (
    TASK,
    ErrorCode,
    JobError,
    JobRequest,
    Progress,
    enqueue,
    fetch_job,
    job_edit,
    job_queue,
    read_failure,
    read_progress,
    record_failure,
    save_progress,
)
from service.contract.settings import Settings
from tests.helpers import EDIT, SOURCE


def test_request_round_trips_through_json_and_gives_the_engine_params():
    request = JobRequest(original_prompt=SOURCE, edit_prompt=EDIT, self_replace_steps="0.4,0.6", steps=7)
    again = JobRequest.model_validate_json(request.model_dump_json())
    assert again == request and again.self_replace_steps == (0.4, 0.6)
    edit = resolve(again)
    params = edit.params
    assert (edit.original_prompt, edit.edit_prompt) == (SOURCE, EDIT)
    assert isinstance(params, EditParams) and params.steps == 7 and params.null_text == EditParams().null_text
    assert {name: getattr(params, name) for name in EditOptions.model_fields} == {
        name: getattr(request, name) for name in EditOptions.model_fields
    }


@pytest.mark.parametrize(
    "change", [{"webhok": "x"}, {"steps": 0}, {"original_prompt": "x" * 1001}, {"self_replace_steps": ""}]
)
def test_request_refuses_unknown_fields_and_bad_values(change):
    with pytest.raises(ValidationError):
        JobRequest(**{"original_prompt": SOURCE, "edit_prompt": EDIT, **change})


def test_the_contract_is_torch_free():
    code = "import sys, service.contract.jobs, service.contract.recovery; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_enqueued_job_names_the_task_and_its_input_blob_and_records_failure_and_progress(redis_server):
    redis = Redis.from_url(redis_server.url)
    settings = Settings(redis_url=redis_server.url, queue_name="contract-test")
    request = JobRequest(findings={"Support Devices": 1}, edit={"Support Devices": 0}, steps=9)
    edit = resolve(request)
    job = enqueue(job_queue(redis, settings), "f" * 32, request, edit, "alice", settings)
    stored = fetch_job(redis, job.id)
    assert stored.func_name == TASK and stored.kwargs["image"] == input_blob(job.id) and stored.kwargs["mask"] is None
    assert JobRequest.model_validate(stored.kwargs["request"]) == request
    assert job_edit(stored) == edit and job_edit(stored).params.steps == 9
    assert job_edit(stored).original_prompt == "Chest X-ray showing Support Devices"
    assert stored.meta["owner"] == "alice" and stored.ttl == settings.job_ttl_s

    assert read_progress(stored) == Progress()
    save_progress(stored, Progress(phase="editing", step=3, total=9))
    assert read_progress(fetch_job(redis, job.id)) == Progress(phase="editing", step=3, total=9)

    assert read_failure(stored).code is ErrorCode.internal
    record_failure(stored, JobError(code=ErrorCode.timeout, message="the job exceeded its time limit"))
    assert read_failure(fetch_job(redis, job.id)) == JobError(code="timeout", message="the job exceeded its time limit")
