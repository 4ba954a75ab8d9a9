"""The fast paths: fp16-safe null-text gradients, fused attention, the two optimisation-free
inversions and the bounded, shared inversion cache."""

import copy
import os
import time

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from models.diffusion.components import embed_prompts, encode_latent
from models.diffusion.ddim import DDIMSampler
from models.diffusion.editing import DenoisePass, EditSpec, build_control, denoise
from models.diffusion.inversion import (
    Inversion,
    InversionCache,
    ddim_invert,
    direct_offsets,
    eps_fp32,
    input_gradient,
    predict_eps,
)
from models.imaging.files import DecodedImage
from models.methods.prism import invert
from models.pipeline import generate_counterfactual
from models.request.params import EditParams, NullTextSettings
from models.request.resolve import ResolvedEdit
from tests.helpers import EDIT, SOURCE, xray_like

STEPS = 8


def _image(bundle, seed: int) -> torch.Tensor:
    return torch.rand(1, 1, bundle.resolution, bundle.resolution, generator=torch.Generator().manual_seed(seed))


def _first_update(bundle, unet, scaled: bool) -> tuple[torch.Tensor, float]:
    """The embedding change after one Adam step of null-text's first outer step, its target
    offset from the model's own guided step by noise of RMS 1e-3 (a loss of about 1e-6)."""
    from phantoms.bench import bench_case
    from phantoms.captions import explicit_caption
    from phantoms.render import render

    anatomy, source, _, _ = bench_case("remove_devices", 0, bundle.resolution)
    cond, uncond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [explicit_caption(source), ""]).chunk(2)
    sampler = DDIMSampler(bundle.scheduler, 10)
    image = torch.from_numpy(render(anatomy, source))[None, None]
    latents = ddim_invert(unet, sampler, encode_latent(bundle.vae, image), cond)
    x, t, t_device = latents[-1], sampler.timesteps[0], sampler.timestep_tensors(latents[-1].device)[0]
    with torch.no_grad():
        eps_c, eps_u = eps_fp32(unet, x, t_device, cond), eps_fp32(unet, x, t_device, uncond)
        target = sampler.step(eps_u + 7.5 * (eps_c - eps_u), t, x)
    target = target + 1e-3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    embedding = uncond.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=1e-2)
    output = predict_eps(unet, x, t_device, embedding)
    upcast = output.detach().float().requires_grad_(True) if scaled else output.float()
    loss = F.mse_loss(sampler.step(upcast + 7.5 * (eps_c - upcast), t, x), target)
    if scaled:
        (grad_output,) = torch.autograd.grad(loss, upcast)
        embedding.grad, finite = input_gradient(output, grad_output, embedding)
        assert finite.all()
    else:
        loss.backward()
    optimizer.step()
    return (embedding - uncond).detach().flatten(), loss.item()


def test_fp16_null_text_gradients_follow_fp32(builtin):
    unet16 = copy.deepcopy(builtin.unet).half()
    reference, loss = _first_update(builtin, builtin.unet, scaled=True)
    assert 1e-7 < loss < 1e-5
    scaled, _ = _first_update(builtin, unet16, scaled=True)
    assert F.cosine_similarity(scaled, reference, dim=0) >= 0.8
    assert 0.5 <= scaled.norm() / reference.norm() <= 2.0
    plain, _ = _first_update(builtin, unet16, scaled=False)  # what an unscaled fp16 backward gives
    assert F.cosine_similarity(plain, reference, dim=0) < 0.5


def test_fused_attention_gives_the_materialised_result(bundle):
    params = EditParams(steps=STEPS, null_text=NullTextSettings(inner_steps=2))
    inversion, _ = invert(bundle, [_image(bundle, 0)], [SOURCE], params)[0]
    specs = [EditSpec(EDIT, v) for v in (0.25, 0.75)]
    cond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [SOURCE, EDIT, EDIT])
    sampler = DDIMSampler(bundle.scheduler, STEPS)
    results = {}
    for fused in (True, False):
        control = build_control(bundle.tokenizer, SOURCE, specs, STEPS, tuple(inversion.x_T.shape[2:]), 0.995)
        (results[fused],) = denoise(
            bundle.unet,
            sampler,
            [DenoisePass(inversion.x_T, inversion.uncond_embeddings, cond, control)],
            7.5,
            fused=fused,
        )
    assert torch.allclose(results[True], results[False], atol=1e-4), (results[True] - results[False]).abs().max()


def test_the_inversion_loops_run_fused_attention_and_give_the_materialised_result(bundle):
    """No attention control runs during inversion, null-text or direct's offsets: the UNet keeps its
    fused (SDPA) processors there, which give what probabilities built in full give."""
    assert {type(p) for p in bundle.unet.attn_processors.values()} == {AttnProcessor2_0}
    fused = copy.deepcopy(bundle)
    materialised = copy.deepcopy(bundle)
    materialised.unet.set_attn_processor(AttnProcessor())
    image = _image(bundle, 4)
    for mode in ("null_text", "direct"):
        params = EditParams(steps=STEPS, inversion=mode, null_text=NullTextSettings(inner_steps=3))
        (a, _), (b, _) = (invert(m, [image], [SOURCE], params)[0] for m in (fused, materialised))
        assert (a.x_T - b.x_T).abs().max() < 1e-4
        assert (a.uncond_embeddings - b.uncond_embeddings).abs().max() < 5e-3  # Adam's normalised steps
        if mode == "direct":
            assert (a.latent_offsets - b.latent_offsets).abs().max() < 1e-4


def test_direct_inversion_keeps_the_source_branch_on_the_inversion_trajectory(bundle):
    sampler = DDIMSampler(bundle.scheduler, STEPS)
    z0 = encode_latent(bundle.vae, _image(bundle, 1))
    cond, uncond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [SOURCE, ""]).chunk(2)
    latents = ddim_invert(bundle.unet, sampler, z0, cond)
    offsets = direct_offsets(bundle.unet, sampler, latents, cond, uncond, 7.5)
    assert offsets.shape == (STEPS, *z0.shape)
    uncond_steps = uncond.expand(STEPS, -1, -1)
    (kept,) = denoise(bundle.unet, sampler, [DenoisePass(latents[-1], uncond_steps, cond, latent_offsets=offsets)], 7.5)
    (free,) = denoise(bundle.unet, sampler, [DenoisePass(latents[-1], uncond_steps, cond)], 7.5)
    kept_error, free_error = (kept - z0).abs().max(), (free - z0).abs().max()
    assert free_error > 0.1  # without the offsets, guidance pulls the branch away from the image
    assert kept_error < 1e-3 * free_error  # with them it retraces it, to float rounding (grown over the steps)


def test_negative_prompt_inversion_reconstructs_better_than_an_empty_prompt(bundle):
    params = EditParams(steps=STEPS, inversion="negative_prompt")
    inversion, _ = invert(bundle, [_image(bundle, 2)], [SOURCE], params)[0]
    cond, uncond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [SOURCE, ""]).chunk(2)
    assert torch.equal(inversion.uncond_embeddings, cond.expand(STEPS, -1, -1))
    assert inversion.losses == [] and inversion.latent_offsets is None
    z0 = encode_latent(bundle.vae, _image(bundle, 2))
    sampler = DDIMSampler(bundle.scheduler, STEPS)
    (negative,) = denoise(bundle.unet, sampler, [DenoisePass(inversion.x_T, inversion.uncond_embeddings, cond)], 7.5)
    (empty,) = denoise(bundle.unet, sampler, [DenoisePass(inversion.x_T, uncond.expand(STEPS, -1, -1), cond)], 7.5)
    assert (negative - z0).pow(2).mean() < 0.5 * (empty - z0).pow(2).mean()


@pytest.mark.parametrize("mode", ["negative_prompt", "direct"])
def test_fast_modes_run_the_whole_pipeline_without_null_text(bundle, mode):
    image = DecodedImage(xray_like(48, 64, seed=3), 8)
    params = EditParams(steps=STEPS, self_replace_steps=(0.4, 0.8), inversion=mode)
    result = generate_counterfactual(
        bundle, image, ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=params)
    )
    assert result.report.inversion.mode == mode and "null_text" not in result.report.timings
    assert ("offsets" in result.report.timings) == (mode == "direct")
    assert result.counterfactual.shape == (48, 64) and len(result.report.candidates) == 2
    if mode == "negative_prompt":  # both branches see the same unconditional embedding: an identity edit is exact
        identity = generate_counterfactual(
            bundle,
            image,
            ResolvedEdit(original_prompt=SOURCE, edit_prompt=SOURCE, params=params.replace(output="decoded")),
        )
        assert abs(identity.reconstruction - identity.counterfactual).max() < 2 / 255


def _entry(key: str) -> Inversion:
    return Inversion(torch.zeros(1, 4, 8, 8), torch.zeros(STEPS, 77, 32), key)


def test_cache_evicts_least_recently_used_and_survives_damaged_files(tmp_path):
    cache = InversionCache(tmp_path, max_bytes=None)
    cache.put(_entry("a"))
    size = (tmp_path / "a.safetensors").stat().st_size
    bounded = InversionCache(tmp_path, max_bytes=2 * size)
    past = time.time() - 100
    os.utime(tmp_path / "a.safetensors", (past, past))
    bounded.put(_entry("b"))
    assert bounded.get("a") is not None  # a hit makes "a" the most recently used, even within a clock tick
    assert (tmp_path / "a.safetensors").stat().st_mtime_ns > (tmp_path / "b.safetensors").stat().st_mtime_ns
    bounded.put(_entry("c"))
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == ["a", "c"]
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "c.safetensors").write_bytes(b"truncated")
    assert bounded.get("c") is None and bounded.get("missing") is None


def test_second_edit_of_an_image_reuses_its_inversion(bundle, tmp_path):
    cache = InversionCache(tmp_path, max_bytes=10**8)
    image = DecodedImage(xray_like(64, 64, seed=6), 8)
    params = EditParams(steps=STEPS, self_replace_steps=(0.5,), null_text=NullTextSettings(inner_steps=2))
    first = generate_counterfactual(
        bundle, image, ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=params), cache=cache
    )
    second = generate_counterfactual(
        bundle,
        image,
        ResolvedEdit(original_prompt=SOURCE, edit_prompt="chest x-ray of a patient", params=params),
        cache=cache,
    )
    assert not first.report.inversion.cached and second.report.inversion.cached
    assert "null_text" in first.report.timings and "null_text" not in second.report.timings
    assert first.report.inversion.key == second.report.inversion.key
    other = generate_counterfactual(
        bundle,
        image,
        ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=params.replace(inversion="direct")),
        cache=cache,
    )
    assert not other.report.inversion.cached and other.report.inversion.key != first.report.inversion.key
