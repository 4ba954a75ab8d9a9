"""Algorithm 1 on the tiny SD-structured model: captions from a CheXpert CSV, the loss falls, the
weights load with --unet-weights, and an interrupted run resumes bit-exactly."""

import csv
import json
import subprocess
import sys

import pytest

from models.request.errors import InvalidInput
from models.request.findings import CONDITIONS
from models.request.params import FinetuneConfig
from models.training.finetune import Finetuner, read_examples
from phantoms.bench import bench_case
from phantoms.render import render
from tests.helpers import write_png
from tests.stack import wait_for

CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CONDITIONS]
ROWS = [
    ({"Support Devices": "1.0", "Cardiomegaly": "1.0"}, "Chest X-ray showing Cardiomegaly, Support Devices"),
    ({"Support Devices": "-1.0", "Edema": "1.0", "Fracture": "0.0"}, "Chest X-ray showing Edema"),
    ({}, "Normal chest X-ray with no significant findings"),
    ({"Pleural Effusion": "1", "Lung Opacity": "-1"}, "Chest X-ray showing Pleural Effusion"),
    ({"No Finding": "1.0"}, "Chest X-ray showing No Finding"),
    ({"Pneumothorax": "0.0", "Atelectasis": " "}, "Normal chest X-ray with no significant findings"),
]


def write_dataset(folder, rows=ROWS):
    """Phantom PNGs under folder/train/patientN/ and a CheXpert-format CSV naming them as CheXpert
    does, from the dataset's own folder (which ``folder`` stands for)."""
    table = folder / "train.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CHEXPERT_COLUMNS)
        writer.writeheader()
        for i, (labels, _) in enumerate(rows):
            anatomy, source, _, _ = bench_case("remove_devices", i, 64)
            path = f"train/patient{i}/study1/view1_frontal.png"
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            write_png(folder / path, render(anatomy, source))
            extra = {"Sex": "Female", "Age": "60", "Frontal/Lateral": "Frontal", "AP/PA": "AP"}
            written = f"CheXpert-v1.0/{path}"
            writer.writerow({"Path": written, **extra, **{c: labels.get(c, "") for c in CONDITIONS}})
    return table


def test_captions_follow_the_template_for_every_label_value(tmp_path):
    examples = read_examples(tmp_path, write_dataset(tmp_path))
    assert [e.captions for e in examples] == [[expected] for _, expected in ROWS]


def test_a_spreadsheet_export_with_a_byte_order_mark_and_other_header_case_reads_the_same(tmp_path):
    table = write_dataset(tmp_path)
    header, body = table.read_text().split("\n", 1)
    exported = tmp_path / "exported.csv"
    exported.write_bytes(("\ufeff" + ",".join(f" {h.lower()}" for h in header.split(",")) + "\n" + body).encode())
    examples = read_examples(tmp_path, exported)
    assert [e.captions for e in examples] == [[expected] for _, expected in ROWS]


def test_a_captions_column_is_used_as_written_and_rows_of_one_image_are_its_wordings(tmp_path):
    write_dataset(tmp_path)
    table = tmp_path / "captions.csv"
    rows = ["Path,caption", "view1_frontal.png,a chest x-ray with a pacemaker", 'view1_frontal.png,"cxr, pacer"']
    table.write_text("\n".join(rows) + "\n")
    (example,) = read_examples(tmp_path / "train" / "patient0" / "study1", table)
    assert example.captions == ["a chest x-ray with a pacemaker", "cxr, pacer"]


def test_a_bad_table_names_what_is_wrong(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("Path,Edema\nx.png,1\n")
    with pytest.raises(InvalidInput, match="^labels: .*neither a 'caption' column"):
        read_examples(tmp_path, table)
    table.write_text("Path,caption\nmissing.png,x\n")
    with pytest.raises(InvalidInput, match="^images: .*line 2: no image missing.png"):
        read_examples(tmp_path, table)
    (tmp_path / "x.png").write_bytes(b"")
    table.write_text("Path,caption\nx.png,a caption\nx.png,  \n")
    with pytest.raises(InvalidInput, match="^labels: .*line 3: the caption is empty"):
        read_examples(tmp_path, table)


def test_a_value_that_is_not_a_label_names_its_line_and_condition(tmp_path):
    table = write_dataset(tmp_path, [*ROWS[:2], ({"Edema": "2"}, "")])
    with pytest.raises(InvalidInput, match="^labels: .*line 4: 'Edema': '2' is not a label"):
        read_examples(tmp_path, table)


CONFIG = FinetuneConfig(steps=8, batch_size=2, learning_rate=1e-3, checkpoint_every=4, warmup_steps=2, seed=1)


def test_the_loss_falls_and_prism_edit_runs_with_the_weights(tmp_path, tiny_model_dir):
    examples = read_examples(tmp_path, write_dataset(tmp_path))
    config = CONFIG.model_copy(update={"steps": 40, "checkpoint_every": 100})
    run = Finetuner(tiny_model_dir, examples, tmp_path / "work", config, "cpu")
    losses = run.run()
    assert len(losses) == 40 and sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses
    out = run.export(tmp_path / "out", full_model=True)
    log = [json.loads(line) for line in (tmp_path / "work" / "finetune.log").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41)) and log[-1]["loss"] == losses[-1]
    edit = subprocess.run(
        [sys.executable, "-m", "cli", "edit", "--model", str(tiny_model_dir),
         "--unet-weights", str(out / "unet.safetensors"), "--image", str(examples[0].path),
         "--original-prompt", "chest x-ray with support devices", "--edit-prompt", "chest x-ray",
         "--out", str(tmp_path / "cf"), "--steps", "3", "--inversion", "direct"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert edit.returncode == 0, edit.stderr
    assert (tmp_path / "cf" / "counterfactual.png").exists()
    assert (out / "model" / "vae").is_dir()
    base_config = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    config = json.loads((out / "model" / "unet" / "config.json").read_text())
    assert "_name_or_path" not in config and config == {k: v for k, v in base_config.items() if k != "_name_or_path"}


def test_an_interrupted_run_resumes_bit_exactly(tmp_path, tiny_model_dir):
    examples = read_examples(tmp_path, write_dataset(tmp_path))
    examples = [e.model_copy(update={"captions": [*e.captions, "chest x-ray"]}) for e in examples]
    update = {"ema_decay": 0.9, "gradient_accumulation": 2, "validate_every": 1, "cache_latents": True}
    config = CONFIG.model_copy(update=update)
    whole = Finetuner(tiny_model_dir, examples, tmp_path / "whole", config, "cpu").run()

    def interrupt_at_step_3(run: Finetuner) -> dict:
        if run.step == 3:
            raise KeyboardInterrupt
        return {}

    first = Finetuner(tiny_model_dir, examples, tmp_path / "parts", config, "cpu")
    with pytest.raises(KeyboardInterrupt):
        first.run(interrupt_at_step_3)
    resumed = Finetuner(tiny_model_dir, examples, tmp_path / "parts", config, "cpu")
    assert resumed.step == 3
    assert resumed.run() == whole  # the same loss sequence, bit for bit


def test_a_run_stopped_mid_step_loses_the_half_step_and_resumes_bit_exactly(tmp_path, tiny_model_dir):
    """Ctrl-C in step 4's second micro-batch, after it drew its noise: the checkpoint is step 3's."""
    examples = read_examples(tmp_path, write_dataset(tmp_path))
    config = CONFIG.model_copy(update={"gradient_accumulation": 2})
    whole = Finetuner(tiny_model_dir, examples, tmp_path / "whole", config, "cpu").run()
    first = Finetuner(tiny_model_dir, examples, tmp_path / "parts", config, "cpu")
    loss, calls = first._loss, []

    def interrupted(indices: list[int]):
        calls.append(indices)
        value = loss(indices)
        if len(calls) == 2 * 3 + 2:
            raise KeyboardInterrupt
        return value

    first._loss = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.run()
    resumed = Finetuner(tiny_model_dir, examples, tmp_path / "parts", config, "cpu")
    assert resumed.step == 3
    assert resumed.run() == whole


def test_a_stop_asked_during_the_weight_update_waits_until_the_step_is_whole(tmp_path, tiny_model_dir):
    examples = read_examples(tmp_path, write_dataset(tmp_path))
    config = CONFIG.model_copy(update={"ema_decay": 0.9})
    whole = Finetuner(tiny_model_dir, examples, tmp_path / "whole", config, "cpu").run()
    first = Finetuner(tiny_model_dir, examples, tmp_path / "parts", config, "cpu")
    ema_step = first.ema.step

    def stop_during_update(parameters) -> None:
        if first.step == 2:
            first.stop.request()
        ema_step(parameters)

    first.ema.step = stop_during_update
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert first.step == 3
    resumed = Finetuner(tiny_model_dir, examples, tmp_path / "parts", config, "cpu")
    assert resumed.step == 3
    assert resumed.run() == whole


def test_sigterm_stops_prism_finetune_and_the_same_command_resumes_it_bit_exactly(tmp_path, tiny_model_dir):
    table = write_dataset(tmp_path)

    def command(work: str) -> list[str]:
        return [sys.executable, "-m", "cli", "finetune", "--base", str(tiny_model_dir),
                "--images", str(tmp_path), "--labels", str(table), "--work", str(tmp_path / work),
                "--out", str(tmp_path / work / "out"), "--steps", "15", "--batch-size", "2",
                "--gradient-accumulation", "2", "--ema-decay", "0.99", "--checkpoint-every", "1000"]  # fmt: skip

    def losses(work: str) -> dict[int, float]:
        lines = (tmp_path / work / "finetune.log").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines)}

    assert subprocess.run(command("whole"), capture_output=True, timeout=600).returncode == 0
    errors = tmp_path / "stderr.txt"  # a file, not a pipe: progress bars would fill a pipe and block the run
    with errors.open("w") as stderr_file:
        process = subprocess.Popen(command("parts"), stdout=subprocess.DEVNULL, stderr=stderr_file)
    log = tmp_path / "parts" / "finetune.log"
    wait_for(lambda: len(log.read_text().splitlines()) if log.exists() else 0, lambda n: n >= 3, "training steps")
    process.terminate()
    process.wait(timeout=600)
    stderr = errors.read_text()
    assert process.returncode == 130, stderr
    stopped_at = len(losses("parts"))
    assert stopped_at < 15 and f"prism finetune: stopped at step {stopped_at}" in stderr
    assert subprocess.run(command("parts"), capture_output=True, timeout=600).returncode == 0
    assert losses("parts") == losses("whole") and len(losses("whole")) == 15


def test_an_unreadable_image_stops_prism_finetune_with_its_path_and_a_checkpoint(tmp_path, tiny_model_dir):
    table = write_dataset(tmp_path)
    bad = tmp_path / "train" / "patient4" / "study1" / "view1_frontal.png"
    bad.write_bytes(b"not an image")
    result = subprocess.run(
        [sys.executable, "-m", "cli", "finetune", "--base", str(tiny_model_dir), "--images", str(tmp_path),
         "--labels", str(table), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
         "--steps", "8", "--batch-size", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"prism finetune: error: images: {bad}: not a PNG, JPEG or DICOM" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "work" / "checkpoint" / "state.pt").is_file()


def test_cached_latents_train_as_latents_encoded_at_every_step(tmp_path, tiny_model_dir):
    examples = read_examples(tmp_path, write_dataset(tmp_path))
    config = CONFIG.model_copy(update={"steps": 4})
    encoded = Finetuner(tiny_model_dir, examples, tmp_path / "a", config, "cpu").run()
    cached_config = config.model_copy(update={"cache_latents": True})
    cached = Finetuner(tiny_model_dir, examples, tmp_path / "b", cached_config, "cpu")
    assert cached.cached_latents.shape == (len(examples), 4, 8, 8)
    assert cached.run() == pytest.approx(encoded, rel=1e-4)


def test_a_work_directory_of_another_run_is_refused(tmp_path, tiny_model_dir):
    examples = read_examples(tmp_path, write_dataset(tmp_path))
    Finetuner(tiny_model_dir, examples, tmp_path / "w", CONFIG.model_copy(update={"steps": 1}), "cpu").run()
    with pytest.raises(InvalidInput, match="^work: "):
        Finetuner(tiny_model_dir, examples, tmp_path / "w", CONFIG.model_copy(update={"steps": 2, "seed": 9}), "cpu")
