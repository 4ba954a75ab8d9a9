"""The Python client (service/client.py) as a PACS caller uses it: a study by reference is sent as
multipart form fields with no image part, ``store_to`` goes with either kind of input, and a call
that names neither an image nor a source is refused before any request. Against a stand-in
transport (tests/fake_prism.py): no service, no PACS."""

from __future__ import annotations

import httpx
import pytest

from service.client import PrismClient
from tests.fake_prism import JOB, FakePrism
from tests.helpers import png_bytes, xray_like

STUDY = "1.2.826.0.1.3680043.8.498.10"
SERIES = "1.2.826.0.1.3680043.8.498.11"


def _client(fake: FakePrism) -> PrismClient:
    return PrismClient("http://prism", transport=httpx.MockTransport(fake), max_retries=0)


def test_a_study_by_reference_is_multipart_fields_and_no_image():
    fake = FakePrism()
    with _client(fake) as prism:
        job = prism.submit(
            source="radiology",
            study_uid=STUDY,
            series_uid=SERIES,
            store_to="radiology",
            findings={"Support Devices": 1},
            edit={"Support Devices": 0},
            steps=10,
        )
    assert job.id == JOB and job.location == f"/jobs/{JOB}" and job.retry_after == 0.0
    assert fake.requests == [("POST", "/counterfactual")]
    assert fake.files() == {}  # no image part, not even an empty one
    assert fake.fields() == {
        "source": "radiology",
        "study_uid": STUDY,
        "series_uid": SERIES,
        "store_to": "radiology",
        "findings": '{"Support Devices": 1}',
        "edit": '{"Support Devices": 0}',
        "steps": "10",
    }
    assert len(fake.forms[0]) == 7  # each field once


def test_an_instance_by_reference_sends_sop_uid_and_leaves_unset_fields_out():
    fake = FakePrism()
    with _client(fake) as prism:
        prism.submit(source="radiology", study_uid=STUDY, sop_uid=f"{SERIES}.1", edit="Support Devices=0")
    assert fake.fields() == {
        "source": "radiology",
        "study_uid": STUDY,
        "sop_uid": f"{SERIES}.1",
        "edit": "Support Devices=0",
    }


def test_an_uploaded_image_may_name_store_to():
    fake = FakePrism()
    image = png_bytes(xray_like(8, 8))
    with _client(fake) as prism:
        prism.submit(image, filename="study.dcm", store_to="radiology", original_prompt="a", edit_prompt="b")
    assert fake.files() == {"image": image}
    assert [filename for name, filename, _ in fake.forms[0] if name == "image"] == ["study.dcm"]
    assert fake.fields() == {"store_to": "radiology", "original_prompt": "a", "edit_prompt": "b"}


@pytest.mark.parametrize(
    "call",
    [
        {},  # neither
        {"study_uid": STUDY},  # a study without its endpoint
        {"image": b"\x89PNG", "source": "radiology", "study_uid": STUDY},  # both
    ],
    ids=["neither", "study-without-source", "both"],
)
def test_neither_an_image_nor_a_source_or_both_is_refused_before_any_request(call):
    fake = FakePrism()
    with _client(fake) as prism, pytest.raises(ValueError, match="give image, or source and study_uid"):
        prism.submit(edit="Support Devices=0", **call)
    assert fake.requests == []


def test_a_batch_forwards_store_to_as_a_form_field():
    fake = FakePrism()
    with _client(fake) as prism:
        batch = prism.submit_batch(b"PK", b"Path\na.dcm\n", edit="Edema=0", store_to="pacs2")
    assert batch.location.startswith("/batches/")
    assert fake.fields() == {"edit": "Edema=0", "store_to": "pacs2"}
    assert set(fake.files()) == {"images", "manifest"}


def test_a_batch_of_studies_goes_without_a_zip():
    fake = FakePrism()
    manifest = f"study_uid,Support Devices\n{STUDY},1\n".encode()
    with _client(fake) as prism:
        prism.submit_batch(None, manifest, edit="Support Devices=0", source="radiology")
    assert fake.files() == {"manifest": manifest}
    assert fake.fields() == {"edit": "Support Devices=0", "source": "radiology"}
