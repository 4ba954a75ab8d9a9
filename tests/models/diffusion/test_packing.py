"""Batched loops: items leave on their own, null-text treats each image as if alone, and several
images' prompt-to-prompt passes share UNet calls without mixing their attention."""

import pytest
import torch

from models.diffusion.components import embed_prompts, encode_latent
from models.diffusion.ddim import DDIMSampler
from models.diffusion.editing import DenoisePass, EditSpec, build_control, denoise
from models.diffusion.inversion import ddim_invert, null_text_optimize
from models.diffusion.packing import LeavePack, PackProgress
from models.request.params import NullTextSettings
from tests.helpers import EDIT, SOURCE

STEPS = 6
PROMPTS = [SOURCE, "chest x-ray showing cardiomegaly"]


def test_items_leave_by_their_callback_or_their_own_error_and_subsets_share_who_left():
    seen = []

    def leave_at_2(phase, step, total):
        seen.append(step)
        if step == 2:
            raise LeavePack

    progress = PackProgress([None, leave_at_2, None])
    assert progress.report("x", 1, 3) is None
    assert progress.report("x", 2, 3) == [0, 2] and progress.alive == [0, 2]
    part = progress.subset([0, 1])
    assert part.alive == [0]
    part.fail(0, ValueError("its mask"))
    assert progress.alive == [2] and set(progress.left) == {0, 1}
    assert seen == [1, 2]

    def broken(*_):
        raise RuntimeError

    with pytest.raises(RuntimeError):
        PackProgress([broken]).report("x", 1, 1)


def _inverted(bundle):
    images = [
        torch.rand(1, 1, bundle.resolution, bundle.resolution, generator=torch.Generator().manual_seed(k))
        for k in (0, 1)
    ]
    sampler = DDIMSampler(bundle.scheduler, STEPS)
    cond = embed_prompts(bundle.text_encoder, bundle.tokenizer, PROMPTS)
    uncond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [""])
    latents = ddim_invert(bundle.unet, sampler, encode_latent(bundle.vae, torch.cat(images)), cond)
    return sampler, latents, cond, uncond


def test_null_text_optimises_each_image_of_a_pack_as_if_alone(bundle):
    """The early-stop threshold is put between the two images' first losses at one step: there one
    image stops at once and is frozen, and the inner steps run the other alone."""
    sampler, latents, cond, uncond = _inverted(bundle)
    _, first = null_text_optimize(bundle.unet, sampler, latents, cond, uncond, 7.5, NullTextSettings(inner_steps=1))
    step = max(range(STEPS), key=lambda i: abs(first[0][i] - first[1][i]) / max(first[0][i], first[1][i]))
    cut = (first[0][step] * first[1][step]) ** 0.5
    settings = NullTextSettings(inner_steps=4, early_stop=cut, early_stop_growth=0.0)
    sizes = []
    hook = bundle.unet.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    try:
        embeddings, losses = null_text_optimize(bundle.unet, sampler, latents, cond, uncond, 7.5, settings)
    finally:
        hook.remove()
    assert 1 in sizes  # an inner step ran one image: the other was frozen
    for k in (0, 1):
        alone, (alone_losses,) = null_text_optimize(
            bundle.unet, sampler, [z[k : k + 1] for z in latents], cond[k : k + 1], uncond, 7.5, settings
        )
        assert embeddings.shape == (2, STEPS, 77, uncond.shape[-1])
        assert losses[k] == pytest.approx(alone_losses, rel=1e-3)
        assert (embeddings[k] - alone[0]).abs().max() < 5e-3  # Adam's normalised steps round differently


@pytest.mark.parametrize("fused", [True, False])
def test_passes_of_several_images_share_unet_calls_without_mixing(bundle, fused):
    sampler, latents, cond, uncond = _inverted(bundle)
    hw = tuple(latents[-1].shape[2:])
    sweeps = [(0.25, 0.75), (0.5,)]  # the first forks its branches mid-way, the second never
    passes = []
    for k, sweep in enumerate(sweeps):
        specs = [EditSpec(EDIT if k == 0 else "normal chest x-ray", v) for v in sweep]
        control = build_control(bundle.tokenizer, PROMPTS[k], specs, STEPS, hw, 0.5)
        prompts = embed_prompts(bundle.text_encoder, bundle.tokenizer, [PROMPTS[k]] + [s.edit_prompt for s in specs])
        passes.append(
            lambda control=control, prompts=prompts, k=k: DenoisePass(
                latents[-1][k : k + 1], uncond.expand(STEPS, -1, -1), prompts, control
            )
        )
    together = denoise(bundle.unet, sampler, [make() for make in passes], 7.5, fused=fused)
    plain = DenoisePass(latents[-1][:1], uncond.expand(STEPS, -1, -1), cond[:1])
    with_plain = denoise(bundle.unet, sampler, [plain, passes[1]()], 7.5, fused=fused)
    for k, make in enumerate(passes):
        (alone,) = denoise(bundle.unet, sampler, [make()], 7.5, fused=fused)
        assert together[k].shape == alone.shape == (1 + len(sweeps[k]), *latents[-1].shape[1:])
        assert (together[k] - alone).abs().max() < 1e-4
    assert (with_plain[1] - together[1]).abs().max() < 1e-4  # a pass without control beside one with
    (plain_alone,) = denoise(bundle.unet, sampler, [plain], 7.5)
    assert (with_plain[0] - plain_alone).abs().max() < 1e-4
