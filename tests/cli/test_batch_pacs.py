"""``prism batch --source/--store-to``: forwarded to the service as the batch's form fields (and
counted in its Idempotency-Key); a manifest of studies (``study_uid`` columns) goes without a ZIP
and needs ``--source``, one of files needs ``--images``; the local route, which has no PACS,
refuses them before anything is read or written. Against a stand-in service
(tests/fake_prism.py): no Redis, no PACS."""

from __future__ import annotations

import pytest

from cli import main
from phantoms.example import write_batch_example
from tests.fake_prism import FakePrism

REFUSAL = (422, "store_to", "no PACS endpoint 'pacs9'; this service knows: radiology")
STUDY = "1.2.826.0.1.3680043.8.498.10"
STUDIES = (
    "study_uid,series_uid,Support Devices,Cardiomegaly\n"
    f"{STUDY},,1,\n"
    f"{STUDY}1,{STUDY}1.2,1,1\n"
    f"{STUDY}2,,0,\n"  # skipped: the edit changes nothing
)


@pytest.fixture
def example(tmp_path, monkeypatch) -> list[str]:
    """``prism batch`` of the README's example (files, by Path)."""
    monkeypatch.setattr("cli.configure_logging", lambda *_: None)  # the root logger stays pytest's
    _, manifest, folder = write_batch_example(tmp_path)
    return ["batch", "--images", str(folder), "--manifest", str(manifest), "--edit", "Support Devices=0"]


@pytest.fixture
def studies(tmp_path, monkeypatch) -> list[str]:
    """``prism batch`` of a manifest of studies."""
    monkeypatch.setattr("cli.configure_logging", lambda *_: None)
    (tmp_path / "studies.csv").write_text(STUDIES)
    return ["batch", "--manifest", str(tmp_path / "studies.csv"), "--edit", "Support Devices=0"]


def _fake(monkeypatch, refuse=REFUSAL) -> FakePrism:
    fake = FakePrism(refuse=refuse)
    monkeypatch.setattr("service.client.PrismClient", fake.client_class())
    return fake


def test_store_to_reaches_the_service_with_the_zip_and_the_manifest(example, tmp_path, monkeypatch, capsys):
    fake = _fake(monkeypatch)
    argv = [*example, "--url", "http://prism", "--store-to", "pacs9", "--steps", "10", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert fake.requests == [("POST", "/batches")]
    assert fake.fields() == {"edit": "Support Devices=0", "store_to": "pacs9", "steps": "10"}
    assert set(fake.files()) == {"images", "manifest"}
    assert f"prism batch: error: --url: 422: body.store_to: {REFUSAL[2]}" in capsys.readouterr().err


def test_a_manifest_of_studies_goes_without_a_zip_with_source_and_store_to(studies, tmp_path, monkeypatch):
    fake = _fake(monkeypatch, refuse=(503, "source", "PACS unavailable"))
    argv = [*studies, "--url", "http://prism", "--source", "radiology", "--store-to", "radiology"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert fake.fields() == {"edit": "Support Devices=0", "source": "radiology", "store_to": "radiology"}
    assert set(fake.files()) == {"manifest"}  # no ZIP: the service retrieves the studies
    sent = fake.files()["manifest"].decode().splitlines()
    assert sent == STUDIES.splitlines()  # every row still to do, as written (nothing done yet)


def test_another_store_to_is_another_batch(example, tmp_path, monkeypatch):
    """The Idempotency-Key is what is sent: a re-run naming another endpoint does not follow the
    first batch (whose outputs went elsewhere)."""
    fake = _fake(monkeypatch)
    base = [*example, "--url", "http://prism", "--out", str(tmp_path / "o")]
    for extra in ([], ["--store-to", "radiology"], ["--store-to", "pacs9"], ["--store-to", "pacs9"]):
        assert main([*base, *extra]) == 2
    keys = [request.headers["Idempotency-Key"] for request in fake.sent]
    assert len(keys) == 4 and len(set(keys[:3])) == 3 and keys[2] == keys[3]


@pytest.mark.parametrize(("flag", "value"), [("--source", "radiology"), ("--store-to", "radiology")])
def test_the_local_route_refuses_pacs_flags_before_any_work(example, flag, value, tmp_path, monkeypatch, capsys):
    fake = _fake(monkeypatch)
    out = tmp_path / "o"
    assert main([*example, flag, value, "--out", str(out)]) == 2
    assert f"prism batch: error: {flag}: PACS endpoints are the service's: needs --url" in capsys.readouterr().err
    assert not out.exists() and fake.requests == []


@pytest.mark.parametrize(
    ("which", "extra", "message"),
    [
        ("studies", [], "--url: the manifest names studies (study_uid): a service reads them from its PACS"),
        ("studies", ["--url", "http://prism"], "--source: the manifest names studies (study_uid): give the PACS"),
        ("studies", ["--url", "http://prism", "--source", "radiology", "--images", "x"], "--images: the manifest"),
        ("example", ["--url", "http://prism", "--source", "radiology"], "--source: is for a manifest of studies"),
        ("files", ["--url", "http://prism"], "--images: give the folder of the images"),
    ],
)
def test_the_manifest_decides_between_images_and_source(
    which, extra, message, example, studies, tmp_path, monkeypatch, capsys
):
    fake = _fake(monkeypatch)
    argv = {"studies": studies, "example": example, "files": [example[0], *example[3:]]}[which]  # files: no --images
    out = tmp_path / "o"
    assert main([*argv, *extra, "--out", str(out)]) == 2
    assert f"prism batch: error: {message}" in capsys.readouterr().err
    assert not out.exists() and fake.requests == []
