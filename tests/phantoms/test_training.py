"""``prism train-builtin`` rebuilds the shipped model: the same files, from the same configs."""

import json
import shlex
import subprocess

import pytest
from safetensors.torch import load_file
from torch.testing import assert_close

from models.builtin import BUILTIN_DIR
from models.loading import load_bundle
from phantoms.model_card import finetune_command
from tests.stack import prism

VOLATILE = {"_name_or_path", "_diffusers_version", "transformers_version", "scaling_factor", "dtype"}


def files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def config(path):
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    """The whole training at a tiny scale (40 phantoms, 10 steps of batch 4 per stage)."""
    root = tmp_path_factory.mktemp("train-builtin")
    args = ["--work", str(root / "work"), "--out", str(root / "out"), "--images", "40", "--scale", "0.001"]
    proc = subprocess.run(prism("train-builtin", *args, "--batch", "4"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return root / "out"


@pytest.fixture(scope="module")
def work(rebuilt):
    return rebuilt.parent / "work"


def test_it_writes_every_file_of_the_shipped_model(rebuilt):
    assert files(rebuilt) == files(BUILTIN_DIR)


def test_components_have_the_shipped_configs(rebuilt):
    for name in ("unet/config.json", "vae/config.json", "text_encoder/config.json", "clip/config.json"):
        assert config(rebuilt / name) == config(BUILTIN_DIR / name), name
    for name in ("local_blend.json", "clip/preprocessor_config.json", "scheduler/scheduler_config.json"):
        assert json.loads((rebuilt / name).read_text()) == json.loads((BUILTIN_DIR / name).read_text()), name


def test_the_card_shows_the_figures_of_its_own_log_and_the_model_loads(rebuilt):
    log = json.loads((rebuilt / "training.json").read_text())
    card = (rebuilt / "MODEL_CARD.md").read_text()
    assert log["recipe"]["unet"] == {"steps": 10, "batch": 4, "lr": 3e-4} and log["recipe"]["images"] == 40
    assert "| unet | UNet + text encoder" in card and f"| {log['stages']['unet']['final_loss']} |" in card
    assert f"{log['measured']['vae_roundtrip_l1']}" in card and "not for clinical use" in card
    assert 0 <= log["measured"]["classifier_accuracy"] <= 1
    bundle = load_bundle(rebuilt, device="cpu")
    assert bundle.resolution == 128 and bundle.blend_maps.side == 16


def test_the_diffusion_stage_is_prism_finetune_on_the_written_phantoms(rebuilt, work, tmp_path):
    """The card's command, run by hand on the phantoms train-builtin wrote, gives its UNet."""
    log = json.loads((rebuilt / "training.json").read_text())
    command = finetune_command(log["finetune"])
    assert command in (rebuilt / "MODEL_CARD.md").read_text()
    command = command.replace("WORK", str(work))
    rows = (work / "phantoms" / "captions.csv").read_text().splitlines()
    assert rows[0] == "Path,caption" and len(rows) == 1 + 4 * 40
    args = shlex.split(command)[2:] + ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--device", "cpu"]
    proc = subprocess.run(prism("finetune", *args), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["steps"] == log["recipe"]["unet"]["steps"]
    by_hand = load_file(tmp_path / "o" / "unet.safetensors")
    by_train_builtin = load_file(work / "finetune" / "out" / "unet.safetensors")
    assert by_hand.keys() == by_train_builtin.keys()
    for name, weight in by_train_builtin.items():
        assert_close(by_hand[name], weight, msg=name)
