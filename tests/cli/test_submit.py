"""``prism submit``'s input flags: exactly one of ``--image`` and ``--source`` (with
``--study-uid``), the reference and ``--store-to`` sent as the service's form fields, and every
wrong combination refused with exit status 2 before any request. Against a stand-in service
(tests/fake_prism.py): no Redis, no workers, no PACS."""

from __future__ import annotations

import json

import pytest

from cli import main
from tests.fake_prism import JOB, FakePrism
from tests.helpers import write_png, xray_like

STUDY = "1.2.826.0.1.3680043.8.498.10"
SERIES = "1.2.826.0.1.3680043.8.498.11"
STORED = {
    "endpoint": "radiology",
    "protocol": "STOW-RS",
    "instances": [{"file": "report.dcm", "sop_instance_uid": "2.25.1", "retrieve_url": None, "status": "stored"}],
}
EDIT = ["--findings", "Support Devices=1", "--edit", "Support Devices=0"]


@pytest.fixture
def fake(monkeypatch) -> FakePrism:
    fake = FakePrism(stored=STORED)
    monkeypatch.setattr("service.client.PrismClient", fake.client_class())
    monkeypatch.setattr("cli.configure_logging", lambda *_: None)  # the root logger stays pytest's
    return fake


def test_a_study_by_reference_is_submitted_stored_back_and_downloaded(fake, tmp_path, capsys):
    argv = ["submit", "--url", "http://prism", "--source", "radiology", "--study-uid", STUDY]
    argv += ["--series-uid", SERIES, "--store-to", "radiology", *EDIT, "--steps", "10", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert fake.files() == {}
    assert fake.fields() == {
        "source": "radiology",
        "study_uid": STUDY,
        "series_uid": SERIES,
        "store_to": "radiology",
        "findings": "Support Devices=1",
        "edit": "Support Devices=0",
        "steps": "10",
    }
    assert fake.requests == [
        ("POST", "/counterfactual"),
        ("GET", f"/jobs/{JOB}"),
        ("GET", f"/jobs/{JOB}/files/result.json"),
    ]
    assert json.loads((tmp_path / "o" / "result.json").read_text()) == {"stored": STORED}
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary == {
        "id": JOB,
        "out": str(tmp_path / "o"),
        "s_clip": 0.25,
        "passed": True,
        "stored": {"endpoint": "radiology", "protocol": "STOW-RS"},
    }


def test_an_uploaded_image_with_store_to_sends_both(fake, tmp_path, capsys):
    image = write_png(tmp_path / "x.png", xray_like(16, 12))
    argv = ["submit", "--url", "http://prism", "--image", str(image), "--store-to", "pacs2", *EDIT]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    assert fake.files() == {"image": image.read_bytes()}
    assert fake.fields() == {"store_to": "pacs2", "findings": "Support Devices=1", "edit": "Support Devices=0"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "one of the arguments --image --source is required"),
        (["--image", "x.png", "--source", "radiology", "--study-uid", STUDY], "not allowed with argument"),
    ],
    ids=["neither", "both"],
)
def test_exactly_one_of_image_and_source_or_argparse_refuses(fake, flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["submit", *flags, *EDIT, "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert fake.requests == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--source", "radiology"], "--study-uid: --source needs the study: --study-uid"),
        (["--source", "radiology", "--series-uid", SERIES], "--study-uid: --source needs the study"),
        (["--image", "x.png", "--study-uid", STUDY], "--study-uid: goes with --source"),
        (["--image", "x.png", "--series-uid", SERIES], "--series-uid: goes with --source"),
        (["--image", "x.png", "--sop-uid", SERIES], "--sop-uid: goes with --source"),
    ],
)
def test_a_reference_flag_out_of_place_exits_2_naming_it_before_any_request(fake, flags, message, tmp_path, capsys):
    assert main(["submit", "--url", "http://prism", *flags, *EDIT, "--out", str(tmp_path / "o")]) == 2
    assert f"prism submit: error: {message}" in capsys.readouterr().err
    assert fake.requests == []
    assert not (tmp_path / "o").exists()


def test_the_service_s_refusal_of_a_reference_exits_2_naming_its_field(monkeypatch, tmp_path, capsys):
    fake = FakePrism(refuse=(422, "source", "no PACS endpoint 'radiology'; this service knows: pacs2"))
    monkeypatch.setattr("service.client.PrismClient", fake.client_class())
    monkeypatch.setattr("cli.configure_logging", lambda *_: None)
    argv = ["submit", "--url", "http://prism", "--source", "radiology", "--study-uid", STUDY, *EDIT]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    message = "prism submit: error: 422: body.source: no PACS endpoint 'radiology'; this service knows: pacs2"
    assert message in capsys.readouterr().err
    assert fake.requests == [("POST", "/counterfactual")]
