"""How the worker names a failure: a code a client can act on, a message without patient data."""

import pytest
from pydantic import ValidationError
from rq.timeouts import JobTimeoutException

from models.request.errors import ImageError, InvalidInput
from service.contract.jobs import ErrorCode, JobError, JobRequest
from worker.runner import JobFailed, failure_of

SECRET = "patient zebra-quokka"


def _validation_error() -> ValidationError:
    try:
        JobRequest(original_prompt=SECRET, edit_prompt=SECRET, steps=0)
    except ValidationError as exc:
        return exc
    raise AssertionError


@pytest.mark.parametrize(
    ("exc", "code", "needle"),
    [
        (JobTimeoutException("took 3601 s"), ErrorCode.timeout, "time limit"),
        (ImageError("cannot decode image: broken PNG"), ErrorCode.invalid_image, "broken PNG"),
        (
            InvalidInput("blend_words", f"word {SECRET!r} occurs in neither prompt"),
            ErrorCode.invalid_parameters,
            "blend_words",
        ),
        (_validation_error(), ErrorCode.invalid_parameters, "steps"),
        (RuntimeError(f"CUDA error while editing {SECRET}"), ErrorCode.internal, "job-1"),
        (JobFailed(JobError(code=ErrorCode.input_expired, message="gone")), ErrorCode.input_expired, "gone"),
    ],
)
def test_failure_codes_and_messages(exc, code, needle):
    error = failure_of(exc, "job-1")
    assert error.code is code and needle in error.message
    assert "zebra" not in error.message
