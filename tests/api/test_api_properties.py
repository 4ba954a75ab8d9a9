"""Property-based run of schemathesis against the service's own /openapi.json.

Half of the POSTs carry a valid PNG and valid prompts so the success paths (202, polling,
downloads) are reached too. Every response must be non-5xx and match the documented schema.
Then every operation gets requests made invalid on purpose (schemathesis's negative mode: wrong
types, values out of range, missing and unknown fields and parameters, its declared headers),
with an ``X-Request-ID`` of any form: none may be a 5xx, and every refusal has the documented shape.
"""

import io
import itertools

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import phantom_batch
from tests.stack import Cluster

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = {"POST /counterfactual": 600, "GET /jobs/{job_id}": 250, "GET /jobs/{job_id}/files/{name}": 150,
            "POST /jobs/{job_id}/cancel": 100, "GET /jobs": 60, "GET /healthz": 20, "GET /livez": 20,
            "GET /readyz": 20, "GET /metrics": 10, "GET /scaling": 10, "GET /service-info": 10,
            "POST /preview": 60, "POST /batches": 80, "GET /batches": 10, "GET /batches/{batch_id}": 30,
            "POST /batches/{batch_id}/cancel": 20, "GET /batches/{batch_id}/dataset.zip": 20}  # fmt: skip


NEGATIVE_EXAMPLES = 60
"""Invalid requests per operation (twice as many for the submissions, half of them odd values in
valid forms): seeded, so the same ones every run."""
REQUEST_ID = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=140
).map(str.strip)
"""Any value a client may send as ``X-Request-ID`` (latin-1 without control characters: what HTTP carries)."""


def documented_error_shape(ctx, response, case) -> None:
    """Every refusal, whatever the request: JSON ``{"detail": [{"loc", "msg", "type"}, ...]}``."""
    if response.status_code < 400:
        return
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.text[:200]
    detail = response.json()["detail"]
    assert detail and all(set(d) == {"loc", "msg", "type"} for d in detail), detail


def _png(side: int, value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), value, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


VALID_FORM = st.fixed_dictionaries(
    {
        "image": st.builds(_png, st.integers(8, 48), st.integers(0, 255)),
        "original_prompt": st.sampled_from(["chest x-ray of a patient with support devices", "chest x-ray"]),
        "edit_prompt": st.sampled_from(["chest x-ray of a patient without support devices", "normal chest x-ray"]),
        "steps": st.integers(1, 3),
        "self_replace_steps": st.sampled_from(["0.5", "0.4,0.8"]),
    }
)

_BATCH_ZIP, _BATCH_CSV, _ = phantom_batch(2)
VALID_BATCH = st.fixed_dictionaries(
    {
        "images": st.just(_BATCH_ZIP),
        "manifest": st.just(_BATCH_CSV),
        "edit": st.sampled_from(["Support Devices=0", "Cardiomegaly=1", "Edema=1"]),
        "steps": st.integers(1, 3),
        "self_replace_steps": st.just("0.5"),
    }
)


VALID_BODIES = {"POST /counterfactual": VALID_FORM, "POST /batches": VALID_BATCH}
ODD_FIELDS = (
    "webhook",
    "edit",
    "findings",
    "classifier_targets",
    "self_replace_steps",
    "blend_words",
    "outputs",
    "seed",
)
ODD_TEXTS = (
    "http://example.org:99999/hook",
    "http://example.org:port/hook",
    "http://[::1/hook",
    '{"Edema": ' * 3000,
    '{"Edema": 1' + "0" * 400 + "}",
    '{"Edema": 1' + "0" * 5000 + "}",
    "[" * 3000 + "]" * 3000,
    "Support Devices=1e999",
    "x" * 5000,
    "\x00",
)
ODD_VALUES = st.one_of(st.integers(0, len(ODD_TEXTS) - 1).map(ODD_TEXTS.__getitem__), st.text(max_size=40))
"""What a field's own parser meets at the edge: ports out of range, a broken IPv6 literal, JSON nested
past the parser's recursion, numbers past a float or Python's 4300 digits, NUL, any text."""


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    limits = {"PRISM_MAX_QUEUE_DEPTH": "100000", "PRISM_RATE_LIMIT_PER_MINUTE": "100000", "PRISM_JOB_TIMEOUT_S": "2"}
    with Cluster(tmp_path_factory.mktemp("schemathesis"), tiny_model_dir, workers=1, **limits) as cluster:
        yield cluster


def test_openapi_contract_holds_for_generated_requests(api):
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    known_jobs: list[str] = []
    known_batches: list[str] = []
    counter = itertools.count()
    calls = {}
    for operation in schema.get_all_operations():
        op = operation.ok()
        label = f"{op.method.upper()} {op.path}"
        strategy = op.as_strategy()
        if label == "POST /counterfactual":
            strategy = st.one_of(strategy, st.tuples(strategy, VALID_FORM).map(lambda p: _with_body(*p)))
        elif label == "POST /batches":
            strategy = st.one_of(strategy, st.tuples(strategy, VALID_BATCH).map(lambda p: _with_body(*p)))
        elif "{job_id}" in op.path:
            strategy = st.tuples(strategy, st.booleans()).map(lambda p: _with_known(*p, "job_id", known_jobs))
        elif "{batch_id}" in op.path:
            strategy = st.tuples(strategy, st.booleans()).map(lambda p: _with_known(*p, "batch_id", known_batches))

        @settings(
            max_examples=EXAMPLES[label],
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=strategy)
        def run(case):
            response = case.call(base_url=api.url, timeout=30)
            next(counter)
            calls[case.operation.label] = calls.get(case.operation.label, 0) + 1
            case.validate_response(response, checks=CHECKS)
            if response.status_code == 202 and case.operation.path == "/counterfactual":
                known_jobs.append(response.json()["id"])
            elif response.status_code == 202 and case.operation.path == "/batches":
                known_batches.append(response.json()["id"])

        run()
    total = next(counter)
    assert total >= 1000, calls
    assert len(known_jobs) >= 50, "valid submissions should reach the success path"
    assert len(known_batches) >= 10, "valid batches should reach the success path"
    finished = [httpx.get(f"{api.url}/jobs/{j}").json()["status"] for j in known_jobs[:5]]
    assert all(s in ("queued", "running", "succeeded", "failed", "canceled") for s in finished)


def _with_body(case, form):
    case.body = {**(case.body or {}), **form}
    return case


def _with_known(case, use_known, name, known):
    if use_known and known:
        case.path_parameters = {**case.path_parameters, name: known[len(known) // 2]}
    return case


def test_invalid_requests_to_every_operation_are_refused_in_the_documented_shape(api):
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    calls: dict[str, int] = {}
    statuses: dict[int, int] = {}
    for operation in schema.get_all_operations():
        try:
            _call_all(api.url, operation.ok(), GenerationMode.NEGATIVE, calls, statuses)
        except Unsatisfiable:  # nothing to make invalid (no parameters, no body): odd headers only
            _call_all(api.url, operation.ok(), GenerationMode.POSITIVE, calls, statuses)
    assert {label.rsplit(" (", 1)[0] for label in calls} == set(EXAMPLES), calls
    assert not any(status >= 500 for status in statuses), statuses
    assert sum(n for label, n in calls.items() if label.endswith("(negative)")) >= 500, calls
    assert calls["POST /counterfactual (odd)"] >= 10 and calls["POST /batches (odd)"] >= 10, calls


def _call_all(url: str, operation, mode: GenerationMode, calls: dict[str, int], statuses: dict[int, int]) -> None:
    """:data:`NEGATIVE_EXAMPLES` requests of ``mode`` to ``operation``, each with an odd ``X-Request-ID``;
    twice as many for the submissions, about half of them valid forms with one field given an odd value."""
    strategy = st.tuples(operation.as_strategy(generation_mode=mode), st.just(mode.value))
    examples = NEGATIVE_EXAMPLES
    if (label := f"{operation.method.upper()} {operation.path}") in VALID_BODIES:
        examples *= 2
        odd = st.tuples(operation.as_strategy(), VALID_BODIES[label], st.sampled_from(ODD_FIELDS), ODD_VALUES)
        odd_cases = odd.map(lambda p: _with_body(p[0], {**p[1], p[2]: p[3]}))
        strategy = st.one_of(strategy, st.tuples(odd_cases, st.just("odd")))

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(generated=strategy, request_id=REQUEST_ID)
    def call(generated, request_id):
        case, kind = generated
        case.headers = {**(case.headers or {}), "X-Request-ID": request_id}
        response = case.call(base_url=url, timeout=30)
        label = f"{case.operation.label} ({kind})"
        calls[label] = calls.get(label, 0) + 1
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error, documented_error_shape])

    call()
