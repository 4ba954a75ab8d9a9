"""Hostile and odd requests on a raw socket to the API under uvicorn, as a client's bytes arrive:
malformed multipart framing, any URL, any header. Every answer is a 4xx in the documented shape
(never a 500, never uvicorn's text/plain), and the keep-alive connection serves the next request;
an exception nothing maps is the documented 500 on a connection that stays open."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from hypothesis import given
from hypothesis import strategies as st

from cli.local_redis import free_port
from service.api.app import create_app
from service.api.middleware import MAX_TEXT_PART_BYTES
from service.contract.settings import Settings
from service.contract.tenants import add_tenant
from tests.helpers import fuzz

SECRET_NAME = "scans/1.2.826.0.1.3680043.8.498.11-patient.png"
"""What an unexpected exception's message quotes here: it must reach no log."""


@dataclass
class Served:
    port: int
    key: str


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def detail(self) -> list[dict]:
        assert self.headers["content-type"] == "application/json", (self.status, self.body[:200])
        detail = json.loads(self.body)["detail"]
        assert detail and all(set(d) == {"loc", "msg", "type"} and isinstance(d["loc"], list) for d in detail)
        return detail


@pytest.fixture(scope="module")
def served(redis_server, tmp_path_factory) -> Iterator[Served]:
    """The API under uvicorn (h11, as ``prism serve`` runs it) in a thread, with API keys on and one
    route that fails as a bug would."""
    tmp = tmp_path_factory.mktemp("hostile")
    key, _ = add_tenant(tmp / "keys", "fuzz")
    settings = Settings(
        redis_url=redis_server.url,
        auth="on",
        api_keys_file=str(tmp / "keys"),
        queue_name=f"hostile-{uuid.uuid4().hex[:8]}",
        blob_url=(tmp / "blobs").as_uri(),
    )
    app = create_app(settings)

    def broken() -> None:
        raise RuntimeError(f"cannot open {SECRET_NAME}")

    app.add_api_route("/broken", broken, include_in_schema=False)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http="h11", log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield Served(port, key)
    server.should_exit = True
    thread.join(30)


def read_answer(conn: socket.socket) -> Answer:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "the connection closed inside an answer"
        body += chunk
    return Answer(int(lines[0].split()[1]), headers, body[:length])


def exchange(port: int, request: bytes) -> tuple[Answer, Answer]:
    """The answer to ``request`` and to a ``GET /livez`` after it on the same connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(request)
        first = read_answer(conn)
        conn.sendall(b"GET /livez HTTP/1.1\r\nHost: t\r\n\r\n")
        return first, read_answer(conn)


def post(path: str, body: bytes, content_type: str, key: str, extra: bytes = b"") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
    ).encode()
    return head + extra + b"\r\n" + body


def form(key: str) -> tuple[bytes, str]:
    request = httpx.Request(
        "POST",
        "http://t/counterfactual",
        data={"original_prompt": "chest x-ray with devices", "edit_prompt": "chest x-ray", "steps": "3"},
        files={"image": ("scan.png", b"\x89PNG\r\n\x1a\nnot really", "image/png")},
    )
    return request.read(), request.headers["content-type"]


def test_an_unexpected_exception_is_the_documented_500_and_the_connection_stays(served, caplog):
    with caplog.at_level(logging.ERROR):
        failed, after = exchange(served.port, b"GET /broken HTTP/1.1\r\nHost: t\r\nX-Request-ID: hl7-0042\r\n\r\n")
    assert failed.status == 500 and failed.headers["x-request-id"] == "hl7-0042"
    assert failed.detail() == [
        {"loc": [], "msg": "internal error; quote request id hl7-0042 when reporting it", "type": "internal"}
    ]
    assert after.status == 200
    assert "RuntimeError" in caplog.text and "/broken" in caplog.text
    assert SECRET_NAME not in caplog.text  # the traceback's frames are logged, the message (input) is not


@pytest.mark.parametrize(
    ("content_type", "body", "status", "loc"),
    [
        ("multipart/form-data", b"--a\r\n\r\n--a--\r\n", 400, ["header", "Content-Type"]),
        ('multipart/form-data; boundary=""', b"--a\r\n\r\n--a--\r\n", 400, ["header", "Content-Type"]),
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n", 400,
         ["body"]),
        ("multipart/form-data; boundary=b", b"--c\r\nContent-Disposition: form-data; name=x\r\n\r\ny\r\n--c--\r\n",
         400, ["body"]),
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=x\r\nbroken header\r\n\r\n",
         400, ["body"]),
        ("multipart/form-data; boundary=b", b"".join(
            b"--b\r\nContent-Disposition: form-data; name=f%d\r\n\r\n1\r\n" % i for i in range(1001)) + b"--b--\r\n",
         400, ["body"]),
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=edit_prompt\r\n\r\n"
         + b"x" * (MAX_TEXT_PART_BYTES + 1) + b"\r\n--b--\r\n", 413, ["body", "edit_prompt"]),
        ("application/x-www-form-urlencoded", b"edit_prompt=" + b"x" * (MAX_TEXT_PART_BYTES + 1), 400, ["body"]),
    ],
    ids=["no-boundary", "empty-boundary", "no-name", "other-boundary", "bad-header", "1001-fields", "big-field",
         "big-urlencoded"],
)  # fmt: skip
def test_malformed_framing_is_a_4xx_naming_what_was_wrong(served, content_type, body, status, loc):
    answer, after = exchange(served.port, post("/counterfactual", body, content_type, served.key))
    assert (answer.status, answer.detail()[0]["loc"]) == (status, loc), answer.body
    assert after.status == 200


@pytest.mark.parametrize(("range_header", "status"), [("bytes=abc", 400), ("bytes=99999999-", 416), ("bytes=5-1", 400)])
def test_a_range_a_file_cannot_serve_is_refused_in_the_documented_shape(served, range_header, status):
    request = f"GET /ui/app.css HTTP/1.1\r\nHost: t\r\nRange: {range_header}\r\n\r\n".encode()
    answer, after = exchange(served.port, request)
    assert answer.status == status and answer.detail()[0]["loc"] == ["header", "Range"]
    assert "x-request-id" in answer.headers and after.status == 200
    whole, _ = exchange(served.port, b"GET /ui/app.css HTTP/1.1\r\nHost: t\r\nRange: bytes=0-9\r\n\r\n")
    assert whole.status == 206 and len(whole.body) == 10


@fuzz(300)
@given(
    mutations=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 16), st.binary(max_size=16)), max_size=4),
    path=st.sampled_from(["/counterfactual", "/batches", "/preview"]),
)
def test_any_mangled_form_is_a_4xx_in_the_documented_shape(served, mutations, path):
    body, content_type = form(served.key)
    for at, cut, insert in mutations:
        body = body[:at] + insert + body[at + cut :]
    answer, after = exchange(served.port, post(path, body, content_type, served.key))
    assert 400 <= answer.status < 500 and answer.detail()
    assert after.status == 200


TARGET = st.lists(
    st.one_of(
        st.sampled_from(["/", "jobs", "batches", "files", "dataset.zip", "cancel", "ui", "static", "docs", "..", "."]),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#"), max_size=8),
        st.binary(max_size=4).map(lambda b: "".join(f"%{x:02X}" for x in b)),
    ),
    max_size=8,
).map(lambda parts: "/" + "".join(parts))
HEADER_VALUE = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c == 9 or 0x20 <= c != 0x7F).strip())


@fuzz(600)
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "OPTIONS"]),
    target=TARGET,
    headers=st.dictionaries(
        st.sampled_from(["X-API-Key", "Idempotency-Key", "X-Request-ID", "Content-Type", "Accept", "Range", "Origin"]),
        HEADER_VALUE,
        max_size=4,
    ),
    with_key=st.booleans(),
)
def test_any_url_and_headers_are_answered_without_a_5xx(served, method, target, headers, with_key):
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: t", b"Content-Length: 0"]
    if with_key:
        headers = {**headers, "X-API-Key": served.key.encode()}
    lines += [name.encode() + b": " + value for name, value in headers.items()]
    answer, after = exchange(served.port, b"\r\n".join(lines) + b"\r\n\r\n")
    assert answer.status < 500, answer.body
    if answer.status >= 400:
        answer.detail()
    assert after.status == 200
