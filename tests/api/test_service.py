"""End-to-end: HTTP in, real Redis and a real worker process, files out."""

import io
import json
import subprocess
import sys
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from redis import Redis

from cli.local_redis import free_port
from models.request.report import EditReport
from tests.helpers import png_bytes, xray_like
from tests.stack import ApiProcess, job_state, poll, service_env, submit


def _submit(url: str, image: bytes, **fields) -> httpx.Response:
    return submit(url, image, **{"steps": "5", "self_replace_steps": "0.4,0.8", **fields})


def test_submit_poll_download(service, redis_server):
    original = xray_like(128, 96)
    r = _submit(service.url, png_bytes(original))
    assert r.status_code == 202, r.text
    body = r.json()
    job_id = body["id"]
    assert body["status"] == "queued" and r.headers["Location"] == f"/jobs/{job_id}"
    assert int(r.headers["Retry-After"]) >= 1

    # the job carries the input's blob key and JSON arguments, not image bytes or pickle
    raw = Redis.from_url(redis_server.url).hget(f"rq:job:{job_id}", "data")
    args = json.loads(zlib.decompress(raw))
    assert args[0] == "worker.tasks.run_counterfactual"
    assert args[3]["image"] == f"jobs/{job_id}/input" and args[3]["request"]["steps"] == 5

    status = poll(service.url, job_id, {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    assert status["started_at"] and status["finished_at"] and status["created_at"]
    result = status["result"]
    assert -1 <= result["s_clip"] <= 1 and result["passed"] == (result["s_clip"] >= 0.1)
    assert result["chosen_self_replace"] in (0.4, 0.8)
    assert set(result["files"]) == {
        "counterfactual.png", "difference.png", "difference.npy", "reconstruction.png", "result.json"
    }  # fmt: skip

    files = {}
    for name, link in result["files"].items():
        f = httpx.get(service.url + link, timeout=10)
        assert f.status_code == 200
        expected = "image/png" if name.endswith(".png") else "application/json" if name.endswith(".json") else None
        if expected:
            assert f.headers["content-type"].startswith(expected)
        files[name] = f.content
    for name in ("counterfactual.png", "reconstruction.png", "difference.png"):
        assert Image.open(io.BytesIO(files[name])).size == (96, 128)
    cf = np.asarray(Image.open(io.BytesIO(files["counterfactual.png"])), dtype=np.float32) / 255
    inp = np.round(original * 255) / 255
    diff = np.load(io.BytesIO(files["difference.npy"]))
    assert diff.shape == (128, 96) and np.allclose(diff, cf - inp, atol=1e-6)
    report = json.loads(files["result.json"])
    assert report["s_clip"] == result["s_clip"]
    assert status["progress"]["phase"] == "scoring"

    # one declaration (EditReport): result.json, the job's result and the OpenAPI schema carry every field
    declared = set(EditReport.model_fields)
    assert set(report) == declared
    assert {k: v for k, v in result.items() if k != "files"} == report
    spec = httpx.get(f"{service.url}/openapi.json").json()
    assert set(spec["components"]["schemas"]["JobResult"]["properties"]) == declared | {"files"}


def test_unknown_job_and_file(service):
    assert httpx.get(f"{service.url}/jobs/nope").status_code == 404
    r = _submit(service.url, png_bytes(xray_like(64, 64)))
    job_id = r.json()["id"]
    poll(service.url, job_id, {"succeeded", "failed"})
    assert httpx.get(f"{service.url}/jobs/{job_id}/files/secret.txt").status_code == 404
    assert httpx.get(f"{service.url}/jobs/{job_id}/files/..%2Fresult.json").status_code == 404
    missing = httpx.get(f"{service.url}/jobs/{job_id}/files/counterfactual.dcm")  # a PNG job has no DICOM
    listed = missing.json()["detail"][0]["msg"].split("its files: ")[1].split(", ")
    assert missing.status_code == 404 and set(listed) == set(job_state(service.url, job_id)["result"]["files"])
    assert "counterfactual.dcm" not in listed and "result.json" in listed


def test_a_job_links_and_serves_only_the_outputs_it_chose(service):
    r = _submit(service.url, png_bytes(xray_like(64, 48)), outputs="counterfactual.png")
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    status = poll(service.url, job_id, {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    chosen = {
        "counterfactual.png": f"/jobs/{job_id}/files/counterfactual.png",
        "result.json": f"/jobs/{job_id}/files/result.json",
    }
    assert status["result"]["files"] == status["links"]["files"] == chosen
    counterfactual = httpx.get(service.url + chosen["counterfactual.png"], timeout=10)
    assert counterfactual.status_code == 200 and Image.open(io.BytesIO(counterfactual.content)).size == (48, 64)
    report = httpx.get(service.url + chosen["result.json"], timeout=10).json()
    assert report["parameters"]["outputs"] == ["counterfactual.png", "result.json"]
    missing = httpx.get(f"{service.url}/jobs/{job_id}/files/difference.npy", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["detail"][0]["msg"].endswith("its files: counterfactual.png, result.json")


@pytest.mark.parametrize(
    ("fields", "field", "status"),
    [
        ({"original_prompt": ""}, "original_prompt", 422),
        ({"edit_prompt": "lung " * 80}, "edit_prompt", 422),
        ({"steps": "0"}, "steps", 422),
        ({"guidance_scale": "abc"}, "guidance_scale", 422),
        ({"self_replace_steps": "0.4,2"}, "self_replace_steps", 422),
        ({"self_replace_steps": "a,b"}, "self_replace_steps", 422),
        ({"blend_words": "pacemaker"}, "blend_words", 422),
        ({"reweight_words": "with"}, "reweight_words", 422),
        ({"outputs": "counterfactual.jpg"}, "outputs", 422),
        ({"outputs": ""}, "outputs", 422),
    ],
)
def test_invalid_fields_are_named(service, fields, field, status):
    r = _submit(service.url, png_bytes(xray_like(32, 32)), **fields)
    assert r.status_code == status, r.text
    assert field in [str(part) for d in r.json()["detail"] for part in d["loc"]]


@pytest.mark.parametrize(
    ("content", "status"),
    [(b"GIF89a" + b"\0" * 20, 415), (b"hello", 415), (b"", 422)],
)
def test_bad_images_are_rejected(service, content, status):
    r = _submit(service.url, content)
    assert r.status_code == status, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "image"]


def test_truncated_png_is_rejected(service):
    r = _submit(service.url, png_bytes(xray_like(64, 64))[:200])
    assert r.status_code == 422 and "truncated" in r.json()["detail"][0]["msg"]


def test_health_ready_and_docs(service):
    assert httpx.get(f"{service.url}/healthz").json() == {"status": "ok", "redis": None, "workers": None}
    ready = httpx.get(f"{service.url}/readyz").json()
    assert ready["status"] == "ok" and ready["workers"] == 1
    spec = httpx.get(f"{service.url}/openapi.json").json()
    post = spec["paths"]["/counterfactual"]["post"]
    assert {"202", "413", "415", "422", "503"} <= set(post["responses"])
    assert "404" in spec["paths"]["/jobs/{job_id}"]["get"]["responses"]
    assert httpx.get(f"{service.url}/docs").status_code == 200


def test_api_process_never_imports_torch():
    code = "import sys, service.api.app, cli; service.api.app.create_app(); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_redis_unreachable_gives_503_with_retry_after(tiny_model_dir, tmp_path):
    api = ApiProcess(service_env(f"redis://127.0.0.1:{free_port()}/0", tiny_model_dir), tmp_path / "api.log")
    try:
        ready = httpx.get(f"{api.url}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["redis"] is False
        r = _submit(api.url, png_bytes(xray_like(32, 32)))
        assert r.status_code == 503 and r.headers["Retry-After"] == "2"
        assert httpx.get(f"{api.url}/jobs/{'0' * 32}", timeout=10).status_code == 503
    finally:
        api.stop()


def test_readyz_without_workers_is_503(redis_server, tiny_model_dir, tmp_path):
    env = service_env(redis_server.url, tiny_model_dir, PRISM_QUEUE_NAME="empty")
    api = ApiProcess(env, tmp_path / "api.log")
    try:
        r = httpx.get(f"{api.url}/readyz", timeout=10)
        assert r.status_code == 503 and r.json() == {"status": "unavailable", "redis": True, "workers": 0}
    finally:
        api.stop()


GREY = png_bytes(xray_like(32, 32))
PROMPTS = {"original_prompt": "chest x-ray with support devices", "edit_prompt": "chest x-ray"}


@pytest.mark.parametrize(
    ("send", "status", "loc", "message"),
    [
        (lambda url: httpx.post(url, json={"image": "x", **PROMPTS}), 415, ["header", "Content-Type"], "multipart"),
        (lambda url: httpx.post(url, data={"image": "x", **PROMPTS}), 415, ["header", "Content-Type"], "multipart"),
        (
            lambda url: httpx.post(url, data={"image": "hello", **PROMPTS}, files={"mask": ("m.png", GREY)}),
            422,
            ["body", "image"],
            "must be a file part (curl: -F image=@file), not text",
        ),
        (
            lambda url: httpx.post(url, data=PROMPTS, files=[("image", ("a.png", GREY)), ("image", ("b.png", GREY))]),
            422,
            ["body", "image"],
            "is given more than once",
        ),
        (
            lambda url: httpx.post(url, data=PROMPTS, files={"image": ("a.png", GREY), "mask": ("m.png", GREY)}),
            422,
            ["body", "mask"],
            "an anatomy mask is used by method=guided only, not by method=prism",
        ),
    ],
    ids=["json", "urlencoded", "text for the file", "two images", "mask without guided"],
)
def test_a_malformed_request_is_told_plainly_what_to_send(service, send, status, loc, message):
    r = send(f"{service.url}/counterfactual")
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert any(d["loc"] == loc and message in d["msg"] for d in detail), detail
    for internal in ("Value error", "<class", "UploadFile"):
        assert internal not in r.text


def test_findings_messages_carry_no_pydantic_prefix(service):
    r = submit(service.url, original_prompt="", edit_prompt="", findings="Support Devices=7", edit="Edema=1")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "findings"], r.text
    assert not r.json()["detail"][0]["msg"].startswith("Value error")
