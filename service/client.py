"""A Python client of the PRISM service: submit, wait (with progress), download, cancel, list.

It needs only httpx (no torch, nothing else of this project), so it can be copied into a
hospital's own tooling. Answers 429 and 503 are retried after their ``Retry-After``; the 202's
``Retry-After`` sets how often :meth:`PrismClient.wait` polls.

    with PrismClient("http://127.0.0.1:8000", api_key=KEY) as prism:
        job = prism.submit("cxr.dcm", findings={"Support Devices": 1}, edit={"Support Devices": 0})
        status = prism.wait(job.id, on_progress=print)
        prism.download_all(status, "out/")
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

FINAL = ("succeeded", "failed", "canceled")


class PrismError(Exception):
    """An error answer; ``detail`` is the service's list of ``{"loc", "msg", "type"}``."""

    def __init__(self, status_code: int, detail: list[dict[str, Any]]) -> None:
        messages = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
        super().__init__(f"{status_code}: {messages}")
        self.status_code = status_code
        self.detail = detail


def _error(response: httpx.Response) -> PrismError:
    """The answer's error: its ``detail``, or its text when something before the service answered
    (a proxy's HTML page, an HTTP server's plain-text refusal)."""
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        detail = None
    if not isinstance(detail, list) or not all(isinstance(d, dict) for d in detail):
        detail = [{"loc": [], "msg": response.text[:500], "type": "http_error"}]
    return PrismError(response.status_code, detail)


@dataclass(frozen=True)
class Submitted:
    id: str
    location: str
    retry_after: float


def _form_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return json.dumps(dict(value))
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return ",".join(str(v) for v in value)
    return str(value)


class PrismClient:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 10,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)
        self.max_retries = max_retries
        self.poll_s = 2.0

    def __enter__(self) -> PrismClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer, after waiting out 429s and 503s (``Retry-After``); raises :class:`PrismError`."""
        for attempt in range(self.max_retries + 1):
            response = self.http.request(method, path, **kwargs)
            if response.status_code not in (429, 503) or attempt == self.max_retries:
                break
            time.sleep(float(response.headers.get("Retry-After", self.poll_s)))
        if response.status_code >= 400:
            raise _error(response)
        return response

    def submit(
        self,
        image: str | Path | bytes | None = None,
        *,
        original_prompt: str | None = None,
        edit_prompt: str | None = None,
        findings: Mapping[str, int | None] | str | None = None,
        edit: Mapping[str, int | None] | str | None = None,
        idempotency_key: str | None = None,
        filename: str | None = None,
        mask: str | Path | bytes | None = None,
        **options: Any,
    ) -> Submitted:
        """Submit a PNG, JPEG or DICOM (a path or bytes) with prompts, or with findings and an edit;
        ``mask`` is the guided method's anatomy mask (a path or bytes of a PNG or JPEG).

        ``options`` are the service's other form fields (``steps``, ``inversion``, ``outputs``,
        ``webhook``, ``webhook_events``, ...); lists and mappings are sent in the service's syntax.

        Instead of ``image``, a study in one of the service's PACS endpoints: ``source`` (the
        endpoint's name) and ``study_uid``, optionally ``series_uid`` or ``sop_uid``; and
        ``store_to`` (an endpoint's name) stores the DICOM outputs back into the input's study:

            prism.submit(source="radiology", study_uid="1.2.840...", store_to="radiology", edit=...)

        A :class:`ValueError`, before any request, for neither ``image`` nor ``source``, or both.
        """
        if (image is None) == (options.get("source") is None):
            raise ValueError("give image, or source and study_uid (a study in one of the service's PACS endpoints)")
        if isinstance(image, str | Path):
            filename = filename or Path(image).name
            image = Path(image).read_bytes()
        if isinstance(mask, str | Path):
            mask = Path(mask).read_bytes()
        fields = {
            "original_prompt": original_prompt,
            "edit_prompt": edit_prompt,
            "findings": findings,
            "edit": edit,
            **options,
        }
        data = {name: _form_value(value) for name, value in fields.items() if value is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        files = {}
        if image is not None:
            files["image"] = (filename or "image", image, "application/octet-stream")
        if mask is not None:
            files["mask"] = ("mask", mask, "application/octet-stream")
        if not files:  # by reference: still multipart (the service takes nothing else), the fields as parts
            data, files = {}, {name: (None, value) for name, value in data.items()}
        response = self._request("POST", "/counterfactual", data=data, files=files, headers=headers)
        retry_after = float(response.headers.get("Retry-After", self.poll_s))
        self.poll_s = retry_after
        return Submitted(response.json()["id"], response.headers["Location"], retry_after)

    def status(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}").json()

    def wait(
        self,
        job_id: str,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Poll until the job has succeeded, failed or been canceled; returns its last status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if on_progress:
                on_progress(status)
            if status["status"] in FINAL:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {status['status']}")
            time.sleep(poll_s or self.poll_s)

    def download(self, job_id: str, name: str, to: str | Path | None = None) -> bytes:
        """A result file's bytes, also written to ``to`` if given."""
        content = self._request("GET", f"/jobs/{job_id}/files/{name}").content
        if to is not None:
            Path(to).write_bytes(content)
        return content

    def download_all(self, status: Mapping[str, Any], directory: str | Path) -> list[Path]:
        """Every file of a succeeded job into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in status["result"]["files"]:
            self.download(status["id"], name, out / name)
            paths.append(out / name)
        return paths

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/cancel").json()

    def jobs(self, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        """A page of this key's jobs, newest first."""
        return self._request("GET", "/jobs", params={"limit": limit, "offset": offset}).json()

    def submit_batch(
        self,
        images: str | Path | bytes | None,
        manifest: str | Path | bytes,
        *,
        edit: Mapping[str, int | None] | str | None = None,
        original_prompt: str | None = None,
        edit_prompt: str | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> Submitted:
        """Submit a ZIP of images (a path or bytes) and its CSV manifest; ``edit`` (labels) or the
        prompts apply to every row that has none of its own; ``options`` are the other form fields,
        ``store_to`` among them. A manifest of studies (a ``study_uid`` column, no ``Path``) goes
        without a ZIP (``images=None``) and with ``source``, the PACS endpoint they are in.
        Answers the batch's id."""
        images = Path(images).read_bytes() if isinstance(images, str | Path) else images
        manifest = Path(manifest).read_bytes() if isinstance(manifest, str | Path) else manifest
        fields = {"edit": edit, "original_prompt": original_prompt, "edit_prompt": edit_prompt, **options}
        data = {name: _form_value(value) for name, value in fields.items() if value is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        files = {"manifest": ("manifest.csv", manifest, "text/csv")}
        if images is not None:
            files = {"images": ("images.zip", images, "application/zip"), **files}
        response = self._request("POST", "/batches", data=data, files=files, headers=headers)
        return Submitted(response.json()["id"], response.headers["Location"], self.poll_s)

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._request("GET", f"/batches/{batch_id}").json()

    def wait_batch(
        self, batch_id: str, on_progress: Callable[[dict[str, Any]], None] | None = None, poll_s: float | None = None
    ) -> dict[str, Any]:
        """Poll until every item of the batch has ended; returns its last status."""
        while True:
            status = self.batch(batch_id)
            if on_progress:
                on_progress(status)
            if status["status"] == "completed":
                return status
            time.sleep(poll_s or self.poll_s)

    def download_dataset(self, batch_id: str, to: str | Path, passed_only: bool = False) -> Path:
        """The batch's dataset ZIP, streamed into the file ``to``."""
        params = {"passed_only": "true"} if passed_only else {}
        with self.http.stream("GET", f"/batches/{batch_id}/dataset.zip", params=params) as response:
            if response.status_code >= 400:
                response.read()
                raise _error(response)
            with Path(to).open("wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
        return Path(to)

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._request("POST", f"/batches/{batch_id}/cancel").json()
