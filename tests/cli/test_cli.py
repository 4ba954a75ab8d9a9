import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cli import main
from service.contract.settings import Settings, get_settings
from tests.helpers import write_png, xray_like


def _prism(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=600)


def test_make_tiny_model_then_edit_writes_all_five_files(tmp_path):
    model = tmp_path / "t"
    assert _prism("make-tiny-model", str(model)).returncode == 0
    original = xray_like(90, 70)
    image = write_png(tmp_path / "any.png", original)
    out = tmp_path / "o"
    proc = _prism(
        "edit", "--model", str(model), "--image", str(image),
        "--original-prompt", "chest x-ray showing support devices",
        "--edit-prompt", "chest x-ray without support devices",
        "--out", str(out), "--steps", "5", "--self-replace", "0.4,0.6,0.8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "counterfactual.png", "difference.npy", "difference.png", "reconstruction.png", "result.json",
    ]  # fmt: skip
    assert "editing" in proc.stderr  # progress bar

    cf_img = Image.open(out / "counterfactual.png")
    assert cf_img.size == (70, 90) and cf_img.mode == "L"
    assert Image.open(out / "reconstruction.png").size == (70, 90)
    assert Image.open(out / "difference.png").size == (70, 90)
    cf = np.asarray(cf_img, dtype=np.float32) / 255
    inp = np.asarray(Image.open(image), dtype=np.float32) / 255
    diff = np.load(out / "difference.npy")
    assert diff.dtype == np.float32 and diff.shape == (90, 70)
    assert np.allclose(diff, cf - inp, atol=1e-6)

    report = json.loads((out / "result.json").read_text())
    assert -1 <= report["s_clip"] <= 1
    assert report["passed"] == (report["s_clip"] >= 0.1)
    assert [c["self_replace_steps"] for c in report["candidates"]] == [0.4, 0.6, 0.8]
    best = max(report["candidates"], key=lambda c: c["s_clip"])
    assert report["chosen_self_replace"] == best["self_replace_steps"] and report["s_clip"] == best["s_clip"]
    assert report["parameters"]["steps"] == 5
    assert {"null_text", "editing", "scoring"} <= set(report["timings"])
    assert report["model"]["identity"]


def test_16_bit_input_gives_16_bit_output(tmp_path, tiny_model_dir):
    image = write_png(tmp_path / "in16.png", xray_like(64, 64), bit_depth=16)
    out = tmp_path / "o"
    proc = _prism(
        "edit", "--model", str(tiny_model_dir), "--image", str(image), "--original-prompt", "chest x-ray",
        "--edit-prompt", "chest x-ray showing cardiomegaly", "--out", str(out), "--steps", "3", "--self-replace", "0.5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cf = np.asarray(Image.open(out / "counterfactual.png"))
    assert cf.dtype == np.uint16
    inp = np.asarray(Image.open(image)).astype(np.float32) / 65535
    assert np.allclose(np.load(out / "difference.npy"), cf.astype(np.float32) / 65535 - inp, atol=1e-6)


def test_missing_model_directory_is_named(tmp_path):
    image = write_png(tmp_path / "x.png", xray_like(32, 32))
    proc = _prism(
        "edit", "--model", str(tmp_path / "missing"), "--image", str(image), "--original-prompt", "chest x-ray",
        "--edit-prompt", "chest x-ray", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "model directory not found" in proc.stderr and str(tmp_path / "missing") in proc.stderr


def test_evaluate_writes_json_and_markdown(tmp_path):
    original = xray_like(128, 128)
    changed = np.clip(original + 0.05, 0, 1)
    for kind, images in (("input", [original, original]), ("counterfactual", [original, changed])):
        (tmp_path / kind).mkdir()
        for i, image in enumerate(images):
            write_png(tmp_path / kind / f"c{i}.png", image)
    manifest = {
        f"c{i}": {"original_prompt": "chest x-ray with support devices", "edit_prompt": "chest x-ray"} for i in (0, 1)
    }
    (tmp_path / "cases.json").write_text(json.dumps(manifest))
    proc = _prism("evaluate", str(tmp_path), "--out", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["summary"]["n"] == 2 and [c["name"] for c in report["cases"]] == ["c0", "c1"]
    assert report["cases"][0]["l1_input"] == 0 and report["cases"][1]["l1_input"] > 0.03
    assert report["summary"]["l1_truth"] is None and report["summary"]["frechet_reference"] == "input"
    assert "| frechet_clip |" in (tmp_path / "eval" / "evaluation.md").read_text()


def test_evaluate_names_a_missing_folder(tmp_path):
    proc = _prism("evaluate", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "prism evaluate: error: " in proc.stderr and "input" in proc.stderr


def test_edit_names_the_flag_and_file_it_cannot_read(tmp_path):
    """Two image files at once: the message says whether the image or the mask failed."""
    image = write_png(tmp_path / "x.png", xray_like(32, 32))
    (tmp_path / "mask.png").write_bytes(b"not an image")
    prompts = ["--original-prompt", "chest x-ray with support devices", "--edit-prompt", "chest x-ray"]
    guided = ["--method", "guided", "--classifier-targets", "Support Devices=0"]
    bad_mask = _prism(
        "edit",
        "--image",
        str(image),
        "--mask",
        str(tmp_path / "mask.png"),
        *guided,
        *prompts,
        "--out",
        str(tmp_path / "o"),
    )
    assert bad_mask.returncode == 2
    assert f"prism edit: error: --mask: {tmp_path / 'mask.png'}: not a PNG, JPEG or DICOM" in bad_mask.stderr
    missing = _prism("edit", "--image", str(tmp_path / "gone.png"), *prompts, "--out", str(tmp_path / "o"))
    assert missing.returncode == 2
    assert f"prism edit: error: --image: {tmp_path / 'gone.png'}: No such file or directory" in missing.stderr


FINETUNE = ["finetune", "--base", "base", "--images", "images", "--labels", "labels.csv"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train-builtin", "--images", "0"], "argument --images: must be above 0, got 0"),
        (["train-builtin", "--images", "99999"], "--images: images must be 1 to 32000"),
        (["train-builtin", "--scale", "-1"], "argument --scale: must be above 0, got -1"),
        (["train-builtin", "--batch", "0"], "argument --batch: must be above 0, got 0"),
        (["bench-speed", "--repeats", "0"], "argument --repeats: must be above 0, got 0"),
        (["bench-speed", "--model", "/nonexistent"], "--model: model directory not found: /nonexistent"),
        (["bench-speed", "--modes", "null_text,fast"], "argument --modes: must be some of null_text, negative_prompt"),
        (["bench-precision", "--dtypes", "float8"], "argument --dtypes: must be some of float32, float16, bfloat16"),
        (["bench-profile", "--inner-steps", "0"], "argument --inner-steps: must be above 0, got 0"),
        (["bench-phantom", "--model", "/nonexistent"], "--model: model directory not found: /nonexistent"),
        (["bench-phantom", "--inner-steps", "-3"], "--inner-steps: Input should be greater than or equal to 0"),
        (["bench-phantom", "--vary", "steps"], "--vary steps: expected OPTION=V1,V2"),
        (["bench-phantom", "--vary", "stepz=5"], "--vary stepz=5: 'stepz' is not an edit option"),
        (["bench-phantom", "--vary", "steps=5,0"], "--vary steps=5,0: steps=0: Input should be greater than"),
        (["make-tiny-model", "/proc/no/such/dir"], "/proc/no/such/dir: No such file or directory"),
        (["serve", "--port", "99999"], "argument --port: must be 1 to 65535, got 99999"),
        (["up", "--workers", "0"], "argument --workers: must be above 0, got 0"),
        (["keys", "add", "reader", "--file", "/proc/no/such/keys"], "--file: /proc/no/such/keys: No such file"),
        ([*FINETUNE, "--learning-rate", "inf"], "--learning-rate: Input should be a finite number"),
        ([*FINETUNE, "--max-grad-norm", "nan"], "--max-grad-norm: Input should be a finite number"),
    ],
)
def test_a_bad_flag_exits_2_naming_it_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    """Nothing is trained, benchmarked or served: the run stops at the flag (before the fixes, a zero
    batch or image count was silently ignored and training started, others ended in a traceback)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cli.configure_logging", lambda *_: None)  # the root logger stays pytest's
    with pytest.raises(SystemExit) if message.startswith("argument") else contextlib.nullcontext():
        assert main(argv) == 2
    out = capsys.readouterr()
    assert message in out.out + out.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:1", "127.0.0.1:8000"], ids=["nothing-listening", "no-scheme"])
def test_submit_names_a_service_it_cannot_reach(url, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("cli.configure_logging", lambda *_: None)
    image = write_png(tmp_path / "x.png", xray_like(32, 32))
    argv = ["submit", "--url", url, "--image", str(image), "--out", str(tmp_path / "o"), "--findings", "Edema=1"]
    assert main([*argv, "--edit", "Edema=0"]) == 2
    assert f"prism submit: error: --url: cannot reach the service at {url}: " in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PRISM_DEVICE", "tpu", "prism: error: PRISM_DEVICE: String should match pattern"),
        ("PRISM_REDIS_URL", "localhost:6379", "prism: error: PRISM_REDIS_URL: String should match pattern"),
        ("PRISM_MAX_QUEUE_DEPTH", "0", "prism: error: PRISM_MAX_QUEUE_DEPTH: Input should be greater than"),
        ("PRISM_BLOB_URL", "/data/blobs", "prism: error: PRISM_BLOB_URL: Value error, must be file:///absolute/path"),
        ("PRISM_BLOB_URL", "gs://bucket", "prism: error: PRISM_BLOB_URL: Value error, must be file:///absolute/path"),
        ("PRISM_BLOB_ENDPOINT", "minio:9000", "prism: error: PRISM_BLOB_ENDPOINT: String should match pattern"),
    ],
)
def test_a_setting_the_service_cannot_use_stops_every_command_naming_it(variable, value, message, monkeypatch, capsys):
    monkeypatch.setenv(variable, value)
    get_settings.cache_clear()
    try:
        assert main(["keys", "add", "reader"]) == 2
    finally:
        get_settings.cache_clear()
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PRISM_DEVICE", "cuda:1"),
        ("PRISM_REDIS_URL", "unix:///tmp/r.sock"),
        ("PRISM_BLOB_URL", "s3://radiology-prism/counterfactuals"),
        ("PRISM_BLOB_URL", "file:///var/lib/prism/blobs"),
        ("PRISM_BLOB_ENDPOINT", "https://minio.hospital.local:9000"),
    ],
)
def test_the_settings_other_forms_are_accepted(variable, value, monkeypatch):
    monkeypatch.setenv(variable, value)
    assert getattr(Settings(), variable.removeprefix("PRISM_").lower()) == value


@pytest.mark.parametrize(
    "variable", ["PRISM_MODEL_DIR", "PRISM_UNET_WEIGHTS", "PRISM_CLIP_MODEL", "PRISM_API_KEYS_FILE", "PRISM_BLOB_URL"]
)
def test_an_empty_path_setting_is_unset(variable, monkeypatch):
    """How a container clears a path its image sets (the worker image sets PRISM_MODEL_DIR): the
    built-in model, not the working directory."""
    monkeypatch.setenv(variable, "")
    assert getattr(Settings(), variable.removeprefix("PRISM_").lower()) is None


def test_a_worker_without_its_model_exits_2_naming_the_directory(tmp_path):
    env = {**os.environ, "PRISM_MODEL_DIR": str(tmp_path / "missing"), "PRISM_REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = subprocess.run([sys.executable, "-m", "cli", "worker"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert f"prism worker: error: model directory not found: {tmp_path / 'missing'}" in proc.stderr
    assert "Traceback" not in proc.stderr
