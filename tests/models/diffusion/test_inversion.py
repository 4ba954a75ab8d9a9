import copy

import numpy as np
import pytest
import torch

from models.diffusion.components import embed_prompts, encode_latent
from models.diffusion.ddim import DDIMSampler
from models.diffusion.editing import DenoisePass, denoise
from models.diffusion.inversion import (
    Inversion,
    InversionCache,
    RowAdam,
    ddim_invert,
    inversion_key,
    null_text_learning_rate,
    null_text_optimize,
)
from models.diffusion.packing import LeavePack, PackProgress
from models.methods.prism import invert
from models.request.params import EditParams, NullTextSettings

PROMPT = "chest x-ray showing support devices"
STEPS = 10


def test_null_text_optimisation_lowers_reconstruction_error(bundle):
    image = torch.rand(1, 1, bundle.resolution, bundle.resolution, generator=torch.Generator().manual_seed(0))
    sampler = DDIMSampler(bundle.scheduler, STEPS)
    z0 = encode_latent(bundle.vae, image)
    cond, uncond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [PROMPT, ""]).chunk(2)
    latents = ddim_invert(bundle.unet, sampler, z0, cond)
    assert len(latents) == STEPS + 1

    (plain,) = denoise(bundle.unet, sampler, [DenoisePass(latents[-1], uncond.expand(STEPS, -1, -1), cond)], 7.5)
    (embeddings,), (losses,) = null_text_optimize(bundle.unet, sampler, latents, cond, uncond, 7.5)
    (optimised,) = denoise(bundle.unet, sampler, [DenoisePass(latents[-1], embeddings, cond)], 7.5)

    plain_error = torch.mean((plain - z0) ** 2).item()
    optimised_error = torch.mean((optimised - z0) ** 2).item()
    assert embeddings.shape == (STEPS, 77, uncond.shape[-1]) and embeddings.dtype == torch.float32
    assert len(losses) == STEPS
    assert optimised_error < 0.5 * plain_error, (optimised_error, plain_error)


def test_null_text_stops_early_when_loss_is_small(bundle):
    sampler = DDIMSampler(bundle.scheduler, 4)
    z0 = torch.zeros(1, 4, 8, 8)
    cond, uncond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [PROMPT, ""]).chunk(2)
    latents = ddim_invert(bundle.unet, sampler, z0, cond)
    calls = []
    settings = NullTextSettings(inner_steps=10, early_stop=1e9)
    hook = bundle.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        null_text_optimize(bundle.unet, sampler, latents, cond, uncond, 7.5, settings)
    finally:
        hook.remove()
    # per outer step: one conditional pass, one inner step (then early stop), one advancing pass
    assert len(calls) == 4 * 3


def test_the_learning_rate_is_the_references_at_50_steps_and_stays_positive_at_any_count():
    assert [null_text_learning_rate(1e-2, i, 50) for i in (0, 10, 49)] == pytest.approx([1e-2, 9e-3, 5.1e-3])
    for steps in (1, 100, 101, 999):
        rates = [null_text_learning_rate(1e-2, i, steps) for i in range(steps)]
        assert rates[0] == 1e-2 and min(rates) > 0.5e-2 - 1e-12 and rates == sorted(rates, reverse=True)


def test_null_text_runs_past_100_steps(bundle):
    """The reference's literal schedule gives Adam a rate of 0 at step 100 (a job of 200 steps
    failed so in the containers of scripts/compose-check.sh)."""
    sampler = DDIMSampler(bundle.scheduler, 101)
    cond, uncond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [PROMPT, ""]).chunk(2)
    latents = ddim_invert(bundle.unet, sampler, torch.zeros(1, 4, 8, 8), cond)
    (embeddings,), (losses,) = null_text_optimize(
        bundle.unet, sampler, latents, cond, uncond, 7.5, NullTextSettings(inner_steps=1)
    )
    assert embeddings.shape[0] == 101 and np.isfinite(losses).all()


@pytest.mark.parametrize("offsets", [None, torch.randn(5, 1, 4, 8, 8)])
def test_inversion_save_load_roundtrip(tmp_path, offsets):
    mode = "null_text" if offsets is None else "direct"
    inv = Inversion(torch.randn(1, 4, 8, 8), torch.randn(5, 77, 32), "abc", mode, offsets, {"steps": 5}, [0.1, 0.2])
    inv.save(tmp_path / "x.safetensors")
    back = Inversion.load(tmp_path / "x.safetensors")
    assert torch.equal(back.x_T, inv.x_T) and torch.equal(back.uncond_embeddings, inv.uncond_embeddings)
    assert (back.key, back.mode, back.settings, back.losses) == ("abc", mode, {"steps": 5}, [0.1, 0.2])
    assert (back.latent_offsets is None) == (offsets is None)
    if offsets is not None:
        assert torch.equal(back.latent_offsets, offsets)


def test_inversion_key_depends_on_every_part():
    image = np.zeros((8, 8), np.float32)
    base = dict(
        image=image,
        prompt=PROMPT,
        model_identity="m1",
        scheduler_config={"beta_start": 0.00085},
        steps=50,
        guidance_scale=7.5,
        null_text=NullTextSettings(),
    )
    key = inversion_key(**base)
    assert inversion_key(**base) == key
    changed = image.copy()
    changed[0, 0] = 1e-3
    variants = {
        "image": changed,
        "prompt": PROMPT + ".",
        "model_identity": "m2",
        "scheduler_config": {"beta_start": 0.001},
        "steps": 49,
        "guidance_scale": 7.0,
        "null_text": NullTextSettings(inner_steps=5),
        "mode": "direct",
    }
    for name, value in variants.items():
        assert inversion_key(**{**base, name: value}) != key, name


def test_cached_inversion_is_reused_only_when_every_part_matches(bundle, tmp_path):
    cache = InversionCache(tmp_path)
    image = torch.rand(1, 1, bundle.resolution, bundle.resolution, generator=torch.Generator().manual_seed(5))
    params = EditParams(steps=4, null_text=NullTextSettings(inner_steps=1))
    first, cached = invert(bundle, [image], [PROMPT], params, cache)[0]
    assert not cached and len(list(tmp_path.glob("*.safetensors"))) == 1
    again, cached = invert(bundle, [image], [PROMPT], params, cache)[0]
    assert cached and torch.equal(again.uncond_embeddings, first.uncond_embeddings)
    for other_image, prompt, p in [
        (image.flip(-1), PROMPT, params),
        (image, "chest x-ray", params),
        (image, PROMPT, params.replace(steps=5)),
        (image, PROMPT, params.replace(guidance_scale=5.0)),
    ]:
        _, cached = invert(bundle, [other_image], [prompt], p, cache)[0]
        assert not cached
    assert len(list(tmp_path.glob("*.safetensors"))) == 5


@pytest.mark.parametrize(
    ("mode", "phase"),
    [("null_text", "inversion"), ("null_text", "null_text"), ("direct", "offsets"), ("negative_prompt", "inversion")],
)
def test_a_callback_takes_its_item_out_and_any_other_error_stops_the_run(bundle, mode, phase):
    class Cancelled(LeavePack):
        pass

    seen = []

    def callback(at, step, total):
        seen.append((at, step, total))
        if (at, step) == (phase, 2):
            raise Cancelled

    image = torch.rand(1, 1, bundle.resolution, bundle.resolution)
    params = EditParams(steps=6, inversion=mode, null_text=NullTextSettings(inner_steps=1))
    progress = PackProgress([callback])
    assert invert(bundle, [image], [PROMPT], params, progress=progress) == {}
    assert isinstance(progress.left[0], Cancelled) and progress.alive == []
    assert seen[-1] == (phase, 2, 6)
    alone_too = PackProgress([callback, None])
    inverted = invert(bundle, [image, image.flip(-1)], [PROMPT, PROMPT], params, progress=alone_too)
    assert list(inverted) == [1] and inverted[1][0].uncond_embeddings.shape[0] == 6  # the other goes on

    def broken(*_):
        raise RuntimeError("not a reason to leave")

    with pytest.raises(RuntimeError):
        invert(bundle, [image, image.flip(-1)], [PROMPT, PROMPT], params, progress=PackProgress([None, broken]))


def test_inversion_key_ignores_diffusers_private_config_entries():
    base = dict(image=np.zeros((8, 8), np.float32), prompt=PROMPT, model_identity="m", steps=5, guidance_scale=7.5)
    one = {"beta_start": 0.00085, "_use_default_values": ["a", "b"]}
    other = {"beta_start": 0.00085, "_use_default_values": ["b", "a"]}  # a set's order, per process
    settings = NullTextSettings()
    assert inversion_key(scheduler_config=one, null_text=settings, **base) == inversion_key(
        scheduler_config=other, null_text=settings, **base
    )


def test_row_adam_is_torch_adam_for_rows_that_step_and_leaves_the_others_as_they_were():
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(3, 5, 4, generator=generator)
    grads = [torch.randn(3, 5, 4, generator=generator) for _ in range(4)]
    reference = start.clone().requires_grad_(True)
    torch_adam = torch.optim.Adam([reference], lr=1e-2)
    rows = RowAdam(start.clone(), lr=1e-2)
    skipping = RowAdam(start.clone(), lr=1e-2)
    for k, grad in enumerate(grads):
        reference.grad = grad
        torch_adam.step()
        rows.step(grad, torch.ones(3, dtype=torch.bool))
        # row 1 skips the first step: after it, it is one step behind with its own step count
        skipping.step(grad, torch.tensor([True, k > 0, True]))
    assert (rows.param - reference.detach()).abs().max() < 1e-7
    assert torch.equal(skipping.param[[0, 2]], rows.param[[0, 2]])
    behind = torch.optim.Adam([one := start[1].clone().requires_grad_(True)], lr=1e-2)
    for grad in grads[1:]:
        one.grad = grad[1]
        behind.step()
    assert (skipping.param[1] - one.detach()).abs().max() < 1e-7
    assert skipping.steps.tolist() == [4, 3, 4]


def _two_images(bundle, steps: int):
    images = torch.cat(
        [
            torch.rand(1, 1, bundle.resolution, bundle.resolution, generator=torch.Generator().manual_seed(k))
            for k in (7, 8)
        ]
    )
    sampler = DDIMSampler(bundle.scheduler, steps)
    cond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [PROMPT, "chest x-ray showing cardiomegaly"])
    uncond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [""])
    return sampler, ddim_invert(bundle.unet, sampler, encode_latent(bundle.vae, images), cond), cond, uncond


def test_null_text_reads_who_runs_every_k_inner_steps_with_the_same_results(bundle):
    """Between reads an image that stopped is masked out of the optimiser while its rows still run
    (at another batch size, hence rounding apart)."""
    sampler, latents, cond, uncond = _two_images(bundle, 4)
    _, first = null_text_optimize(bundle.unet, sampler, latents, cond, uncond, 7.5, NullTextSettings(inner_steps=1))
    cut = (first[0][0] * first[1][0]) ** 0.5  # one image stops at its first inner step, the other runs on
    settings = NullTextSettings(inner_steps=4, early_stop=cut, early_stop_growth=0.0)
    results, rows = {}, {}
    for every in (1, 4):
        sizes = []
        hook = bundle.unet.register_forward_pre_hook(lambda _, args, sizes=sizes: sizes.append(args[0].shape[0]))
        try:
            results[every] = null_text_optimize(
                bundle.unet, sampler, latents, cond, uncond, 7.5, settings, check_every=every
            )
        finally:
            hook.remove()
        rows[every] = sum(sizes)
    (embeddings, losses), (sparse_embeddings, sparse_losses) = results[1], results[4]
    assert (embeddings - sparse_embeddings).abs().max() < 1e-4
    assert np.allclose(losses, sparse_losses, rtol=1e-4)
    assert rows[4] > rows[1]  # the stopped image's rows ran until the read


class _Overflowing(torch.nn.Module):
    """A bf16 UNet whose backward pass overflows for row 0 while its incoming gradient peaks above
    ``limit`` (as fp16's range would, at a larger peak), and for every row when ``always``."""

    def __init__(self, unet, limit: float = 16.0) -> None:
        super().__init__()
        self.unet, self.limit, self.grad_calls = unet, limit, []

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, sample, timestep, encoder_hidden_states):
        out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)
        if torch.is_grad_enabled():
            self.grad_calls.append(sample.shape[0])
            out.sample = _OverflowRowZero.apply(out.sample, self.limit)
        return out


class _OverflowRowZero(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, limit):
        ctx.limit = limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad[0].abs().max() > ctx.limit:
            grad = grad.clone()
            grad[0] = float("inf")
        return grad, None


def test_an_overflowing_row_takes_its_step_again_with_a_smaller_scale_and_the_others_go_on(bundle):
    bf16 = copy.deepcopy(bundle.unet).to(torch.bfloat16)
    sampler, latents, cond, uncond = _two_images(bundle, 3)
    settings = NullTextSettings(inner_steps=2, early_stop=0.0, early_stop_growth=0.0)
    plain, plain_losses = null_text_optimize(bf16, sampler, latents, cond, uncond, 7.5, settings)
    overflowing = _Overflowing(bf16)
    retried, retried_losses = null_text_optimize(overflowing, sampler, latents, cond, uncond, 7.5, settings)
    # per outer step: both rows, row 0 alone again (its scale lowered 256 times), then row 0 alone
    assert overflowing.grad_calls == [2, 2, 1] * 3
    assert torch.equal(retried[1], plain[1]) and retried_losses[1] == plain_losses[1]
    assert (retried[0] - plain[0]).abs().max() < 0.05 and retried_losses[0] == pytest.approx(plain_losses[0], rel=0.1)
    hopeless = _Overflowing(bf16, limit=-1.0)  # row 0 overflows at every scale: it gives up its steps unchanged
    stuck, _ = null_text_optimize(hopeless, sampler, latents, cond, uncond, 7.5, settings)
    assert torch.equal(stuck[0], uncond.expand(3, -1, -1)) and torch.equal(stuck[1], plain[1])
