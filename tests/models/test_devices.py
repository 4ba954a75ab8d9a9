"""Every engine loop on a device other than the CPU's (``tests/device.py``): DDIM inversion,
null-text (early stops, an item leaving, fp32 and the scaled bf16 gradient), direct's offsets,
editing with prompt-to-prompt control and LocalBlend, SDEdit, classifier guidance and scoring, at
batch 1 and 3. No operation mixes devices, no step copies from the host or waits for the device
except where it must, and the results are the CPU's (to the rounding of the attention kernel,
which PyTorch picks by device)."""

import copy
import itertools
from collections import defaultdict

import numpy as np
import pytest
import torch

from models.diffusion.components import embed_prompts, encode_latent
from models.diffusion.ddim import DDIMSampler
from models.diffusion.inversion import ddim_invert, null_text_optimize
from models.diffusion.packing import LeavePack
from models.imaging.files import DecodedImage
from models.pipeline import PackItem, generate_counterfactual, generate_counterfactuals
from models.request.params import EditParams, NullTextSettings
from models.request.resolve import ResolvedEdit
from models.scoring.classifier import FindingClassifier
from models.weights.builtin import BUILTIN_DIR
from tests.device import DEVICE, DeviceMixError, FakeDevice, Traffic, on_device, to_host
from tests.helpers import EDIT, SOURCE, xray_like

STEPS = 5
INNER = 2


@pytest.fixture(scope="module")
def fake(bundle):
    """The tiny model on the fake device (used inside FakeDevice only)."""
    with FakeDevice():
        return on_device(bundle)


class Steps:
    """Progress callbacks that note the traffic at the end of each item's every step, and make an
    item leave where asked."""

    def __init__(self, traffic: Traffic | None = None) -> None:
        self.traffic = traffic
        self.marks: dict[tuple[int, str], list[tuple[int, int]]] = defaultdict(list)

    def callback(self, item: int, leave_at: tuple[str, int] | None = None):
        def report(phase: str, step: int, total: int) -> None:
            if self.traffic is not None:
                self.marks[item, phase].append(self.traffic.snapshot())
            if (phase, step) == leave_at:
                raise LeavePack

        return report

    def per_step(self, item: int, phase: str) -> list[tuple[int, int]]:
        """(reads, uploads) of each step of ``phase`` after its first (which carries the phase's setup)."""
        marks = self.marks[item, phase]
        assert len(marks) >= 3, (item, phase, marks)
        return [(r1 - r0, u1 - u0) for (r0, u0), (r1, u1) in itertools.pairwise(marks)]


def _items(batch: int, params: EditParams, steps: Steps) -> list[PackItem]:
    """``batch`` images of other sizes; with more than one, the last leaves during the inversion's loops."""
    leave = {"null_text": ("null_text", 2), "direct": ("offsets", 2)}[params.inversion]
    return [
        PackItem(
            DecodedImage(xray_like(48 + 8 * k, 64, seed=k), 8),
            ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=params),
            steps.callback(k, leave if batch > 1 and k == batch - 1 else None),
        )
        for k in range(batch)
    ]


def _assert_same(device_result, cpu_result) -> None:
    if isinstance(cpu_result, Exception):
        assert type(device_result) is type(cpu_result)
        return
    assert device_result.report.chosen_self_replace == cpu_result.report.chosen_self_replace
    assert abs(device_result.report.s_clip - cpu_result.report.s_clip) < 1e-3
    assert np.abs(device_result.counterfactual - cpu_result.counterfactual).max() <= 2 / 255
    assert device_result.report.model.device == str(DEVICE)


@pytest.mark.parametrize("inversion", ["null_text", "direct"])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_prism_pipeline_runs_on_another_device(bundle, fake, batch, inversion):
    params = EditParams(
        steps=STEPS, self_replace_steps=(0.4, 0.8), inversion=inversion, null_text=NullTextSettings(inner_steps=INNER)
    )
    on_cpu = generate_counterfactuals(bundle, _items(batch, params, Steps()))
    with FakeDevice() as traffic:
        steps = Steps(traffic)
        on_device_ = generate_counterfactuals(fake, _items(batch, params, steps))
    for device_result, cpu_result in zip(on_device_, on_cpu, strict=True):
        _assert_same(device_result, cpu_result)
    if batch > 1:
        assert isinstance(on_device_[-1], LeavePack)
    # no step of a loop copies from the host but where the host picks rows (an item left, the
    # sweep's candidates part); null-text reads which images still run once per inner step
    loop = "null_text" if inversion == "null_text" else "offsets"
    left = [1] if batch > 1 else []  # per_step[i] is step i + 2, with what followed step i + 1's report
    for phase, reads_allowed, uploads_at in (
        ("inversion", 0, []),
        (loop, INNER if loop == "null_text" else 0, left),
        ("editing", 0, [int(0.4 * STEPS) - 1]),
    ):
        per_step = steps.per_step(0, phase)
        assert max(reads for reads, _ in per_step) <= reads_allowed, (phase, per_step)
        assert [i for i, (_, uploads) in enumerate(per_step) if uploads] == uploads_at, (phase, per_step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_null_text_stops_each_image_on_its_own_on_another_device(bundle, fake, dtype):
    """The early-stop threshold lies between two images' first losses: one stops at once, the other
    runs its inner steps; in bf16 the gradient goes through the UNet scaled, row by row."""

    def run(b, threshold=0.0):
        images = torch.stack(
            [torch.rand(1, b.resolution, b.resolution, generator=torch.Generator().manual_seed(k)) for k in (0, 1)]
        )
        sampler = DDIMSampler(b.scheduler, STEPS)
        cond = embed_prompts(b.text_encoder, b.tokenizer, [SOURCE, EDIT])
        uncond = embed_prompts(b.text_encoder, b.tokenizer, [""])
        latents = ddim_invert(b.unet, sampler, encode_latent(b.vae, images), cond)
        settings = NullTextSettings(inner_steps=3, early_stop=threshold, early_stop_growth=0.0)
        return null_text_optimize(b.unet, sampler, latents, cond, uncond, 7.5, settings)

    cpu = copy.deepcopy(bundle)
    cpu.unet.to(dtype)
    _, first = run(cpu)
    cut = (first[0][0] * first[1][0]) ** 0.5
    embeddings, losses = run(cpu, cut)
    with FakeDevice():
        device_embeddings, device_losses = to_host(run(on_device(cpu), cut))
    assert (min(losses[0][0], losses[1][0]) < cut) and (max(losses[0][0], losses[1][0]) >= cut)
    # how far the embeddings moved, and the losses, as on the CPU; bf16's 8-bit mantissa rounds the
    # device's attention kernel apart from the CPU's, and the optimisation carries that on (measured:
    # 6e-5 of the move and 4e-6 of the losses in fp32; 0.23 and 0.08 in bf16)
    start = embed_prompts(bundle.text_encoder, bundle.tokenizer, [""])[:, None]
    moved, device_moved = embeddings - start, device_embeddings - start
    tolerance = 1e-3 if dtype == torch.float32 else 0.5
    assert device_embeddings.device.type == "cpu"
    assert (moved - device_moved).norm() / moved.norm() < tolerance
    assert np.allclose(device_losses, losses, rtol=tolerance / 2)


def test_sdedit_guided_and_scoring_run_on_another_device(bundle, fake):
    image = DecodedImage(xray_like(64, 48, seed=7), 8)
    keep = np.zeros((64, 48), bool)
    keep[:, :20] = True
    cases = [
        (EditParams(method="sdedit", steps=STEPS, strength=0.8), None),
        (EditParams(method="guided", steps=STEPS, classifier_targets={"Support Devices": 0}), keep),
    ]
    for params, mask in cases:
        edit = ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=params)
        cpu = generate_counterfactual(
            bundle, image, edit, keep=mask, classifier=FindingClassifier.load(BUILTIN_DIR / "classifier.safetensors")
        )
        with FakeDevice() as traffic:
            steps = Steps(traffic)
            device = generate_counterfactual(
                fake,
                image,
                edit,
                keep=mask,
                callback=steps.callback(0),
                classifier=FindingClassifier.load(BUILTIN_DIR / "classifier.safetensors"),
            )
        _assert_same(device, cpu)
        assert all(uploads == 0 and reads == 0 for reads, uploads in steps.per_step(0, "editing")), params.method


def test_the_harness_refuses_what_cuda_refuses():
    """A CPU index into a device tensor's index_copy (the null-text bug it was built for), and a CPU
    mask in torch.where, raise; a CPU scalar and a CPU index to plain indexing do not."""
    with FakeDevice() as traffic:
        x = torch.zeros(3, 2, device=DEVICE)
        with pytest.raises(DeviceMixError, match="same device"):
            x.index_copy(0, torch.tensor([1]), torch.ones(1, 2, device=DEVICE))
        with pytest.raises(DeviceMixError):
            torch.where(torch.ones(3, 1, dtype=torch.bool), x, x)
        y = (x + torch.tensor(2.0))[[0, 2]]
        assert y.device == DEVICE and y.cpu().tolist() == [[2.0, 2.0], [2.0, 2.0]]
        assert y.sum().item() == 8.0
    assert traffic.snapshot() == (2, 1)  # item, cpu(); the list index
