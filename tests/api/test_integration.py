"""The integration surface: a client generated from /openapi.json, the Python client and
``prism submit``, job listing, metrics, request ids, JSON logs, CORS."""

import importlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from models.request.params import EditParams
from models.request.resolve import ResolvedEdit
from service.api.app import create_app
from service.client import PrismClient, PrismError
from service.contract.jobs import JobRequest, enqueue, job_queue
from service.contract.settings import Settings
from tests.helpers import EDIT, SOURCE, png_bytes, write_png, xray_like
from tests.stack import ApiProcess, Cluster, poll, prism, service_env, submit, wait_for, wait_running


def _generator() -> str:
    found = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    assert found, "openapi-python-client is installed by the test extras"
    return found


def test_a_client_generated_from_the_live_schema_submits_polls_and_downloads(service, tmp_path):
    spec = tmp_path / "openapi.json"
    spec.write_text(httpx.get(f"{service.url}/openapi.json").text)
    config = tmp_path / "config.yaml"
    config.write_text("package_name_override: prism_generated\nproject_name_override: prism-generated\n")
    out = tmp_path / "generated"
    proc = subprocess.run(
        [_generator(), "generate", "--path", str(spec), "--output-path", str(out), "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sys.path.insert(0, str(out))
    try:
        generated = importlib.import_module("prism_generated")
        submit_api = importlib.import_module("prism_generated.api.counterfactuals.submit_counterfactual")
        get_job = importlib.import_module("prism_generated.api.jobs.get_job")
        get_file = importlib.import_module("prism_generated.api.jobs.get_job_file")
        models = importlib.import_module("prism_generated.models")
        types = importlib.import_module("prism_generated.types")
        client = generated.Client(base_url=service.url, raise_on_unexpected_status=True)
        form = models.CounterfactualForm(
            image=types.File(
                payload=io.BytesIO(png_bytes(xray_like(40, 30))), file_name="x.png", mime_type="image/png"
            ),
            original_prompt=SOURCE,
            edit_prompt=EDIT,
            steps=3,
            self_replace_steps=[0.4, 0.8],
        )
        accepted = submit_api.sync_detailed(client=client, body=form)
        assert accepted.status_code == 202 and accepted.headers["Location"] == f"/jobs/{accepted.parsed.id}"
        job_id = accepted.parsed.id
        status = get_job.sync(job_id, client=client)
        while status.status.value not in ("succeeded", "failed"):
            time.sleep(0.2)
            status = get_job.sync(job_id, client=client)
        assert status.status.value == "succeeded" and [c.self_replace_steps for c in status.result.candidates] == [
            0.4,
            0.8,
        ]
        downloaded = get_file.sync_detailed(job_id, "counterfactual.png", client=client)
        assert downloaded.status_code == 200
        assert Image.open(io.BytesIO(downloaded.content)).size == (30, 40)
        unknown = submit_api.sync_detailed(
            client=client,
            body=models.CounterfactualForm(
                image=types.File(payload=io.BytesIO(b"GIF89a"), file_name="x.gif"),
                original_prompt=SOURCE,
                edit_prompt=EDIT,
            ),
        )
        assert unknown.status_code == 415 and unknown.parsed.detail[0].loc == ["body", "image"]
    finally:
        sys.path.remove(str(out))


def test_python_client_submits_waits_downloads_and_lists(service, tmp_path):
    seen = []
    with PrismClient(service.url) as client:
        job = client.submit(
            png_bytes(xray_like(36, 28)),
            original_prompt=SOURCE,
            edit_prompt=EDIT,
            steps=4,
            self_replace_steps=[0.5],
            filename="scan.png",
        )
        assert job.location == f"/jobs/{job.id}" and job.retry_after >= 1
        status = client.wait(
            job.id, on_progress=lambda s: seen.append((s["status"], s["progress"]["phase"])), poll_s=0.1
        )
        assert status["status"] == "succeeded" and seen[-1][0] == "succeeded"
        assert {phase for _, phase in seen} & {"inversion", "null_text", "editing", "scoring"}
        paths = client.download_all(status, tmp_path / "out")
        assert sorted(p.name for p in paths) == sorted(status["result"]["files"])
        assert Image.open(tmp_path / "out" / "counterfactual.png").size == (28, 36)
        listed = client.jobs(limit=100)
        assert job.id in [j["id"] for j in listed["jobs"]]
        with pytest.raises(PrismError) as info:
            client.cancel(job.id)
        assert info.value.status_code == 409 and info.value.detail[0]["type"] == "conflict"


@pytest.mark.parametrize(
    ("status", "body", "content_type", "message"),
    [
        (400, b"Invalid HTTP request received.", "text/plain", "400: : Invalid HTTP request received."),
        (502, b"<html>Bad Gateway</html>", "text/html", "502: : <html>Bad Gateway</html>"),
        (404, b'{"detail": "Not Found"}', "application/json", '404: : {"detail": "Not Found"}'),
        (422, b'{"detail": [{"loc": ["body", "steps"], "msg": "too many", "type": "value_error"}]}',
         "application/json", "422: body.steps: too many"),
    ],
)  # fmt: skip
def test_the_client_reports_any_error_answer_as_prism_error(tmp_path, status, body, content_type, message):
    """What answers before the service (a proxy, the HTTP server itself) is reported too, not a traceback."""
    answer = httpx.MockTransport(
        lambda request: httpx.Response(status, content=body, headers={"content-type": content_type})
    )
    with PrismClient("http://prism", transport=answer, max_retries=0) as client:
        with pytest.raises(PrismError, match=re.escape(message)) as info:
            client.batch("0" * 32)
        assert info.value.status_code == status
        with pytest.raises(PrismError, match=str(status)):
            client.download_dataset("0" * 32, tmp_path / "d.zip")


def test_prism_submit_from_the_readme(service, tmp_path):
    image = write_png(tmp_path / "scan.png", xray_like(40, 40))
    proc = subprocess.run(
        prism("submit", "--url", service.url, "--image", str(image), "--original-prompt", SOURCE,
              "--edit-prompt", EDIT, "--steps", "3", "--self-replace", "0.5", "--out", str(tmp_path / "o")),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["out"] == str(tmp_path / "o") and -1 <= summary["s_clip"] <= 1
    # Polling may miss the short phases; the last one's end is always saved, so the bar must show it.
    assert (tmp_path / "o" / "result.json").exists() and "scoring: 100%" in proc.stderr


def test_prism_submit_sends_its_outputs_and_downloads_only_those(service, tmp_path):
    image = write_png(tmp_path / "scan.png", xray_like(40, 40))
    proc = subprocess.run(
        prism("submit", "--url", service.url, "--image", str(image), "--original-prompt", SOURCE,
              "--edit-prompt", EDIT, "--steps", "3", "--self-replace", "0.5",
              "--outputs", "difference.npy", "counterfactual.png", "--out", str(tmp_path / "o")),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    written = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert written == ["counterfactual.png", "difference.npy", "result.json"]
    assert np.load(tmp_path / "o" / "difference.npy").shape == (40, 40)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mask", "{image}"], "an anatomy mask is used by method=guided only"),
        (["--webhook", "https://example.org/hook", "--webhook-events", "finished"], "webhook_events"),
    ],
)
def test_prism_submit_sends_its_mask_and_webhook_events(service, tmp_path, flags, message):
    image = write_png(tmp_path / "scan.png", xray_like(40, 40))
    proc = subprocess.run(
        prism("submit", "--url", service.url, "--image", str(image), "--original-prompt", SOURCE,
              "--edit-prompt", EDIT, "--out", str(tmp_path / "o"), *[f.format(image=image) for f in flags]),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_client_waits_out_retry_after(monkeypatch):
    full = {"detail": [{"loc": [], "msg": "full", "type": "queue_full"}]}
    answers = iter(
        [
            httpx.Response(503, headers={"Retry-After": "3"}, json=full),
            httpx.Response(429, headers={"Retry-After": "7"}, json={"detail": []}),
            httpx.Response(202, headers={"Location": "/jobs/abc", "Retry-After": "5"}, json={"id": "abc"}),
        ]
    )
    sleeps = []
    monkeypatch.setattr("service.client.time.sleep", sleeps.append)
    with PrismClient("http://prism.test", transport=httpx.MockTransport(lambda request: next(answers))) as client:
        job = client.submit(b"\x89PNG", original_prompt=SOURCE, edit_prompt=EDIT)
    assert sleeps == [3.0, 7.0] and job.id == "abc" and job.retry_after == 5.0 and client.poll_s == 5.0


def test_jobs_are_listed_per_key_newest_first_in_pages(tmp_path, tiny_model_dir):
    keys = tmp_path / "keys"
    made = [subprocess.run(prism("keys", "add", name, "--file", str(keys)), capture_output=True, text=True, check=True)
            for name in ("alice", "bob")]  # fmt: skip
    alice, bob = ({"X-API-Key": m.stdout.strip().splitlines()[-1]} for m in made)
    assert "whsec_" in made[0].stdout and "whsec_" not in made[0].stdout.splitlines()[-1]
    settings = {"PRISM_AUTH": "on", "PRISM_API_KEYS_FILE": str(keys), "PRISM_RATE_LIMIT_PER_MINUTE": "100"}
    with Cluster(tmp_path, tiny_model_dir, workers=0, **settings) as c:
        ids = [submit(c.url, headers=alice).json()["id"] for _ in range(5)]
        bob_id = submit(c.url, headers=bob).json()["id"]
        first = httpx.get(f"{c.url}/jobs", params={"limit": 2}, headers=alice).json()
        assert [j["id"] for j in first["jobs"]] == ids[::-1][:2] and first["total"] == 5
        rest = httpx.get(c.url + first["next"], headers=alice).json()
        assert [j["id"] for j in rest["jobs"]] == ids[::-1][2:4]
        last = httpx.get(f"{c.url}/jobs", params={"limit": 2, "offset": 4}, headers=alice).json()
        assert [j["id"] for j in last["jobs"]] == ids[:1] and last["next"] is None
        assert [j["id"] for j in httpx.get(f"{c.url}/jobs", headers=bob).json()["jobs"]] == [bob_id]
        assert httpx.get(f"{c.url}/jobs").status_code == 401
        assert httpx.get(f"{c.url}/jobs", params={"limit": 0}, headers=alice).status_code == 422


def test_metrics_show_jobs_by_status_and_phase_timings(service):
    job_id = submit(service.url, steps="2").json()["id"]
    poll(service.url, job_id, {"succeeded"})
    text = httpx.get(f"{service.url}/metrics").text
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert lines['prism_jobs{status="succeeded"}'] >= 1 and 'prism_jobs{status="queued"}' in lines
    assert lines["prism_live_workers"] == 1 and "prism_queue_depth" in lines
    for phase in ("inversion", "null_text", "editing", "scoring"):
        assert lines[f'prism_phase_seconds_count{{phase="{phase}"}}'] >= 1
        assert lines[f'prism_phase_seconds_bucket{{le="+Inf",phase="{phase}"}}'] >= 1
    assert lines["prism_queue_wait_seconds_count"] >= 1 and lines["prism_run_seconds_count"] >= 1


def test_scaling_counts_running_jobs_beside_queued_ones(service):
    """KEDA's metrics-api trigger reads this: a running job has left the queue's list but still
    needs its worker, so a pool scaled on the list alone would shrink under it."""
    running = submit(service.url, steps="60").json()["id"]
    wait_running(service.url, running)
    queued = submit(service.url, steps="2").json()["id"]
    assert httpx.get(f"{service.url}/scaling").json() == {"queued": 1, "running": 1, "workers_wanted": 2}
    assert httpx.post(f"{service.url}/jobs/{running}/cancel").status_code == 202
    poll(service.url, queued, {"succeeded"})
    assert httpx.get(f"{service.url}/scaling").json() == {"queued": 0, "running": 0, "workers_wanted": 0}


@pytest.mark.parametrize(("batch", "jobs", "wanted"), [(1, 5, 5), (4, 5, 2), (4, 8, 2), (4, 0, 0)])
def test_scaling_wants_a_worker_per_batch_of_jobs(redis_server, batch, jobs, wanted):
    settings = Settings(
        redis_url=redis_server.url, auth="off", queue_name=f"scaling-{uuid.uuid4().hex[:8]}", worker_pack=batch
    )
    queue = job_queue(Redis.from_url(redis_server.url), settings)
    edit = ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=EditParams())
    for _ in range(jobs):
        enqueue(queue, uuid.uuid4().hex, JobRequest(), edit, "o", settings)
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/scaling").json() == {"queued": jobs, "running": 0, "workers_wanted": wanted}
    finally:
        queue.empty()


def test_request_ids_are_returned_and_logged(service):
    mine = httpx.get(f"{service.url}/livez", headers={"X-Request-ID": "3f1c2a9e8b7d4c6a9e0f1a2b3c4d5e6f"})
    assert mine.status_code == 200 and mine.headers["X-Request-ID"] == "3f1c2a9e8b7d4c6a9e0f1a2b3c4d5e6f"
    made = httpx.get(f"{service.url}/jobs/{'0' * 32}").headers["X-Request-ID"]
    assert len(made) == 32 and made != mine.headers["X-Request-ID"]
    for theirs in ("my-req-42", "MSH.10:20261204.0001_a", "x" * 128):  # a hospital tool's own ids are kept
        assert httpx.get(f"{service.url}/livez", headers={"X-Request-ID": theirs}).headers["X-Request-ID"] == theirs
    for unsafe in ("x" * 129, "two words", "a/b", "id\u00e9".encode()):  # others are replaced by a fresh one
        answer = httpx.get(f"{service.url}/livez", headers={"X-Request-ID": unsafe}).headers["X-Request-ID"]
        assert len(answer) == 32 and int(answer, 16) >= 0
    wait_for(
        service.log.read_text,
        lambda log: "[3f1c2a9e8b7d4c6a9e0f1a2b3c4d5e6f]" in log and f"[{made}]" in log,
        "both request ids in the log",
        stall_s=60,
    )


def test_json_logs_cors_and_livez(redis_server, tiny_model_dir, tmp_path):
    env = service_env(redis_server.url, tiny_model_dir, PRISM_LOG_FORMAT="json",
                      PRISM_CORS_ORIGINS='["https://viewer.example.org"]')  # fmt: skip
    api = ApiProcess(env, tmp_path / "api.log")
    try:
        preflight = {"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "POST"}
        allowed = httpx.options(f"{api.url}/counterfactual", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://viewer.example.org"
        other = httpx.options(f"{api.url}/counterfactual", headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 400
        assert httpx.get(f"{api.url}/livez", headers={"X-Request-ID": "a" * 32}).json() == {
            "status": "ok", "redis": None, "workers": None
        }  # fmt: skip
        text = wait_for(api.log.read_text, lambda log: "a" * 32 in log, "the request id in the log", stall_s=60)
        records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert any(r.get("correlation_id") == "a" * 32 and r["levelname"] == "INFO" for r in records)
    finally:
        api.stop()


def test_cors_is_off_by_default(service):
    preflight = {"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{service.url}/counterfactual", headers=preflight)
    assert "access-control-allow-origin" not in r.headers and r.status_code == 405
