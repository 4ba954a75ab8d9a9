"""The PACS endpoints file: every entry checked when the service starts, a bad one named; an
endpoint a request names is looked up by name only."""

from __future__ import annotations

import pytest

from cli import main
from models.request.errors import InvalidInput
from service.contract.pacs import PacsFileError, endpoint, load_endpoints
from service.contract.settings import get_settings


def _file(tmp_path, text: str) -> str:
    path = tmp_path / "pacs.toml"
    path.write_text(text)
    load_endpoints.cache_clear()
    return str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[endpoints.a]\n", "endpoint 'a': Value error, needs dicomweb, dicom, or both"),
        ('[endpoints.a]\ndicomweb = { url = "ftp://x" }\n', "endpoint 'a': dicomweb.url: String should match"),
        ('[endpoints.a]\ndicomweb = { url = "http://x", auth = "basic" }\n', "basic auth needs username and"),
        ('[endpoints.a]\ndicomweb = { url = "http://x", auth = "bearer", token_file = "/nope" }\n', "/nope is not"),
        ('[endpoints.a]\ndicom = { ae_title = "A", host = "h", port = 0 }\n', "endpoint 'a': dicom.port: Input"),
        ('[endpoints.a]\ndicom = { ae_title = "A", host = "h", port = 1, x = 1 }\n', "dicom.x: Extra inputs"),
        ("[other]\n", "must hold [endpoints.<name>] tables and nothing else"),
        ("[endpoints\n", "cannot read"),
    ],
)
def test_a_bad_endpoint_is_refused_naming_the_entry(tmp_path, text, message):
    with pytest.raises(PacsFileError) as info:
        load_endpoints(_file(tmp_path, text))
    assert message in str(info.value)


def test_a_bad_file_stops_every_command_with_exit_2_naming_the_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRISM_PACS_FILE", _file(tmp_path, '[endpoints.radiology]\ndicomweb = { url = "x" }\n'))
    get_settings.cache_clear()
    try:
        assert main(["keys", "add", "reader"]) == 2
    finally:
        get_settings.cache_clear()
    assert "PRISM_PACS_FILE" in (err := capsys.readouterr().err) and "endpoint 'radiology': dicomweb.url" in err


def test_an_endpoint_is_found_by_name_and_an_unknown_one_names_the_field(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("t0ken\n")
    text = (
        f'[endpoints.radiology]\ndicomweb = {{ url = "https://pacs.local/dicom-web", auth = "bearer", '
        f'token_file = "{secret}" }}\ndicom = {{ ae_title = "PACS", host = "pacs.local", port = 104 }}\n'
    )
    path = _file(tmp_path, text)
    pacs = endpoint(path, "radiology", "store_to")
    assert pacs.endpoint.dicom.calling_ae == "PRISM" and pacs.endpoint.dicomweb.auth == "bearer"
    with pytest.raises(InvalidInput) as info:
        endpoint(path, "research", "store_to")
    assert info.value.field == "store_to" and "this service knows: radiology" in info.value.message
    with pytest.raises(InvalidInput, match="none is configured"):
        endpoint(None, "radiology", "source")
