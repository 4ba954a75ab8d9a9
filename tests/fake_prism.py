"""A stand-in for the PRISM service behind the Python client (an ``httpx.MockTransport``): it keeps
every request, reads each submission's multipart form, and answers as a service whose jobs have
already succeeded. For tests of what the client and the CLI send, without Redis, workers or a PACS."""

from __future__ import annotations

import email.parser
import email.policy
import json
from functools import partial

import httpx

from service.client import PrismClient

JOB = "0" * 31 + "1"
BATCH = "0" * 31 + "2"


def form_parts(request: httpx.Request) -> list[tuple[str, str | None, bytes]]:
    """The request's multipart parts in order: (name, filename or None, content); a ValueError for
    a body that is not multipart/form-data (the service takes nothing else)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ValueError(f"not multipart/form-data: {content_type!r}")
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.read())
    return [
        (part.get_param("name", header="content-disposition"), part.get_filename(), part.get_payload(decode=True))
        for part in message.iter_parts()
    ]


class FakePrism:
    """The transport's handler: ``requests`` (method, path), ``sent`` (each submission, headers
    and all) and ``forms`` (each submission's parts)."""

    def __init__(self, stored: dict | None = None, refuse: tuple[int, str, str] | None = None) -> None:
        """``stored``: the job result's ``stored``; ``refuse``: (status, field, message) to answer
        every submission with, as the service refuses one."""
        self.requests: list[tuple[str, str]] = []
        self.sent: list[httpx.Request] = []
        self.forms: list[list[tuple[str, str | None, bytes]]] = []
        self.stored = stored
        self.refuse = refuse

    def fields(self, index: int = -1) -> dict[str, str]:
        """The plain fields (no filename) of a submission, by name."""
        return {name: value.decode() for name, filename, value in self.forms[index] if filename is None}

    def files(self, index: int = -1) -> dict[str, bytes]:
        """The file parts of a submission, by name."""
        return {name: value for name, filename, value in self.forms[index] if filename is not None}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path
        self.requests.append((method, path))
        if method == "POST" and path in ("/counterfactual", "/batches"):
            self.sent.append(request)
            self.forms.append(form_parts(request))
            if self.refuse is not None:
                status, field, message = self.refuse
                detail = [{"loc": ["body", field], "msg": message, "type": "value_error"}]
                return httpx.Response(status, json={"detail": detail})
            job = JOB if path == "/counterfactual" else BATCH
            where = f"/jobs/{job}" if path == "/counterfactual" else f"/batches/{job}"
            return httpx.Response(
                202, json={"id": job, "status": "queued"}, headers={"Location": where, "Retry-After": "0"}
            )
        if method == "GET" and path == f"/jobs/{JOB}":
            result = {
                "s_clip": 0.25,
                "passed": True,
                "files": {"result.json": f"/jobs/{JOB}/files/result.json"},
                "stored": self.stored,
            }
            progress = {"phase": "scoring", "step": 1, "total": 1}
            return httpx.Response(200, json={"id": JOB, "status": "succeeded", "progress": progress, "result": result})
        if method == "GET" and path == f"/jobs/{JOB}/files/result.json":
            return httpx.Response(200, content=json.dumps({"stored": self.stored}).encode())
        return httpx.Response(404, json={"detail": [{"loc": ["path"], "msg": "not found", "type": "not_found"}]})

    def client_class(self):
        """:class:`PrismClient` bound to this transport, to stand in for it where a command makes one."""
        return partial(PrismClient, transport=httpx.MockTransport(self), max_retries=0)
