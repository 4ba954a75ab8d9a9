"""``prism train-builtin`` rebuilds the shipped model: the same files, from the same configs."""

import json
import shlex
import subprocess

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from torch.testing import assert_close

from models.diffusion.components import VAE_ENCODER_PREFIXES, load_bundle
from models.training.stopping import StopSwitch
from models.weights.builtin import BUILTIN_DIR
from phantoms import architecture
from phantoms.model_card import finetune_command
from phantoms.recipe import StageRecipe
from phantoms.training.stage import Stage
from phantoms.training.vae import train_decoder
from tests.stack import prism, wait_for

WEIGHTS = (
    "vae/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "clip/model.safetensors",
    "classifier.safetensors",
)
VOLATILE = {"_name_or_path", "_diffusers_version", "transformers_version", "scaling_factor", "dtype"}


def files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def config(path):
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in VOLATILE}


def tiny_training(root) -> list[str]:
    """The whole training at a tiny scale (12 phantoms, 10 steps of batch 2 per stage)."""
    args = ["--work", str(root / "work"), "--out", str(root / "out"), "--images", "12", "--scale", "0.001"]
    return prism("train-builtin", *args, "--batch", "2")


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-builtin")
    proc = subprocess.run(tiny_training(root), capture_output=True, text=True)
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
    assert log["recipe"]["unet"] == {"steps": 10, "batch": 2, "lr": 3e-4} and log["recipe"]["images"] == 12
    assert "| unet | UNet + text encoder" in card and f"| {log['stages']['unet']['final_loss']} |" in card
    assert f"{log['measured']['vae_roundtrip_l1']}" in card and "not for clinical use" in card
    assert 0 <= log["measured"]["classifier_accuracy"] <= 1
    bundle = load_bundle(rebuilt, device="cpu")
    assert bundle.resolution == 128 and bundle.blend_maps.side == 16


def test_sigterm_stops_train_builtin_and_the_same_command_resumes_it_exactly(rebuilt, tmp_path):
    """SIGTERM during the diffusion stage (three of its ten steps logged): exit 130, then the same
    command finishes the run with every stage's weights bit-equal to an uninterrupted run's."""
    errors = tmp_path / "stderr.txt"  # a file, not a pipe: progress bars would fill a pipe and block the run
    with errors.open("w") as stderr_file:
        process = subprocess.Popen(tiny_training(tmp_path), stdout=subprocess.DEVNULL, stderr=stderr_file)
    log = tmp_path / "work" / "finetune" / "finetune.log"
    wait_for(lambda: len(log.read_text().splitlines()) if log.exists() else 0, lambda n: n >= 3, "diffusion steps")
    process.terminate()
    process.wait(timeout=600)
    stderr = errors.read_text()
    assert process.returncode == 130, stderr
    assert f"prism train-builtin: stopped; checkpoints in {tmp_path / 'work'}, run again to resume" in stderr
    assert not (tmp_path / "out" / "classifier.safetensors").exists()
    resumed = subprocess.run(tiny_training(tmp_path), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for weights in WEIGHTS:
        assert_close(load_file(tmp_path / "out" / weights), load_file(rebuilt / weights), rtol=0, atol=0)


def test_the_diffusion_stage_is_prism_finetune_on_the_written_phantoms(rebuilt, work, tmp_path):
    """The card's command, run by hand on the phantoms train-builtin wrote, gives its UNet."""
    log = json.loads((rebuilt / "training.json").read_text())
    command = finetune_command(log["finetune"])
    assert command in (rebuilt / "MODEL_CARD.md").read_text()
    command = command.replace("WORK", str(work))
    rows = (work / "phantoms" / "captions.csv").read_text().splitlines()
    assert rows[0] == "Path,caption" and len(rows) == 1 + 4 * 12
    args = shlex.split(command)[2:] + ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--device", "cpu"]
    proc = subprocess.run(prism("finetune", *args), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["steps"] == log["recipe"]["unet"]["steps"]
    by_hand = load_file(tmp_path / "o" / "unet.safetensors")
    by_train_builtin = load_file(work / "finetune" / "out" / "unet.safetensors")
    assert by_hand.keys() == by_train_builtin.keys()
    for name, weight in by_train_builtin.items():
        assert_close(by_hand[name], weight, msg=name)


def test_the_decoder_stage_trains_the_decoder_alone(rebuilt, work):
    """The latent space the UNet was trained on is the VAE stage's: its encoder is kept bit for bit."""
    before = torch.load(work / "vae.ckpt", weights_only=True)["vae"]
    after = AutoencoderKL.from_pretrained(rebuilt / "vae").state_dict()
    assert before.keys() == after.keys()
    encoder = [k for k in after if k.startswith(VAE_ENCODER_PREFIXES)]
    assert len(encoder) > 10 and all(torch.equal(before[k], after[k]) for k in encoder)
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    log = json.loads((rebuilt / "training.json").read_text())
    assert log["recipe"]["decoder"] == {"steps": 10, "batch": 2, "lr": 3e-4}
    assert log["stages"]["decoder"]["final_loss"] > 0


def test_the_decoder_stage_lowers_the_round_trip_error(work, tmp_path):
    vae = architecture.vae()
    vae.load_state_dict(torch.load(work / "vae.ckpt", weights_only=True)["vae"])
    vae.save_pretrained(tmp_path / "out" / "vae")
    images = np.ascontiguousarray(np.load(work / "data.npz")["images"][:, ::2, ::2])  # half size: quarter the work
    x = torch.from_numpy(images).float()[:, None] / 127.5 - 1

    def round_trip_error() -> float:
        model = AutoencoderKL.from_pretrained(tmp_path / "out" / "vae")
        with torch.no_grad():
            return float((model.decode(model.encode(x).latent_dist.mean).sample - x).abs().mean())

    start = round_trip_error()
    (tmp_path / "work").mkdir()
    train_decoder(images, tmp_path / "work", tmp_path / "out", StageRecipe(40, 4, 2e-3), torch.device("cpu"))
    assert round_trip_error() < 0.7 * start


def _toy_stage(work, interrupt_at: int | None = None, interrupt: str = "raised") -> tuple[float, torch.nn.Module]:
    """Six steps whose batches come from the stage's numpy generator and torch's, as every
    phantom stage's do; a new process's start (seeds, fresh weights) each call. At step
    ``interrupt_at`` a KeyboardInterrupt is raised, or a stop requested as a signal handler does."""
    work.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    stop = StopSwitch()
    stage = Stage("toy", work, {"model": model}, opt, StageRecipe(steps=6, batch=2, lr=0.1), rng, stop)

    def step_fn(step: int) -> float:
        if step == interrupt_at:
            if interrupt == "raised":
                raise KeyboardInterrupt
            stop.request()
        x = torch.from_numpy(rng.normal(size=(2, 4))).float() + torch.randn(2, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return stage.run(step_fn, every=2), model


@pytest.mark.parametrize(
    ("interrupt", "resumes_at"),
    [("raised", 2), ("requested", 4)],
    ids=["ctrl-c-without-handler-loses-step-3", "stop-request-keeps-step-3"],
)
def test_a_stage_resumed_from_its_checkpoint_redoes_the_lost_steps_exactly(tmp_path, interrupt, resumes_at):
    """Stopped during step 3 (checkpoints every 2): a bare KeyboardInterrupt loses the step and
    resumes from step 2; a stop request lets step 3 finish and checkpoints step 4. Either way the
    resumed stage ends bit-equal to an uninterrupted one."""
    whole_loss, whole = _toy_stage(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _toy_stage(tmp_path / "parts", interrupt_at=3, interrupt=interrupt)
    assert torch.load(tmp_path / "parts" / "toy.ckpt", weights_only=True)["step"] == resumes_at
    resumed_loss, resumed = _toy_stage(tmp_path / "parts")
    assert resumed_loss == whole_loss
    assert_close(resumed.state_dict(), whole.state_dict(), rtol=0, atol=0)
