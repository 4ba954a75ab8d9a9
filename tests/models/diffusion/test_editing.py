import torch

from models.diffusion.components import embed_prompts, encode_latent
from models.diffusion.ddim import DDIMSampler
from models.diffusion.editing import DenoisePass, EditSpec, build_control, denoise
from models.methods.prism import invert
from models.request.params import EditParams, NullTextSettings

SOURCE = "chest x-ray of a patient with support devices"
EDIT = "chest x-ray of a patient without support devices"
STEPS = 8


def _setup(bundle, image):
    params = EditParams(steps=STEPS, null_text=NullTextSettings(inner_steps=2))
    ((inversion, _),) = invert(bundle, [image], [SOURCE], params).values()
    return inversion


def _run(bundle, inversion, specs, blend_threshold=0.3):
    latent_hw = tuple(inversion.x_T.shape[2:])
    control = build_control(bundle.tokenizer, SOURCE, specs, STEPS, latent_hw, blend_threshold)
    cond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [SOURCE] + [s.edit_prompt for s in specs])
    sampler = DDIMSampler(bundle.scheduler, STEPS)
    (latents,) = denoise(
        bundle.unet, sampler, [DenoisePass(inversion.x_T, inversion.uncond_embeddings, cond, control)], 7.5
    )
    return latents, control


def test_batched_sweep_equals_separate_passes(bundle):
    torch.manual_seed(0)
    image = torch.rand(1, 1, bundle.resolution, bundle.resolution)
    inversion = _setup(bundle, image)
    specs = [EditSpec(EDIT, v) for v in (0.25, 0.5, 0.75)] + [EditSpec("chest x-ray of a patient", 0.5)]
    batched, _ = _run(bundle, inversion, specs)
    for k, spec in enumerate(specs):
        single, _ = _run(bundle, inversion, [spec])
        assert torch.allclose(single[0], batched[0], atol=1e-4)
        assert torch.allclose(single[1], batched[1 + k], atol=1e-4), (k, (single[1] - batched[1 + k]).abs().max())
    # the sweep values matter: candidates differ from each other
    assert (batched[1] - batched[3]).abs().max() > 1e-3


def test_identity_edit_reproduces_the_source_branch(bundle):
    image = torch.rand(1, 1, bundle.resolution, bundle.resolution, generator=torch.Generator().manual_seed(3))
    inversion = _setup(bundle, image)
    latents, _ = _run(bundle, inversion, [EditSpec(SOURCE, 0.5)])
    assert torch.allclose(latents[0], latents[1], atol=1e-5)


def test_local_blend_keeps_source_latents_outside_the_final_mask(bundle):
    image = torch.rand(1, 1, bundle.resolution, bundle.resolution, generator=torch.Generator().manual_seed(1))
    inversion = _setup(bundle, image)
    # random weights attend almost uniformly: a threshold near 1 leaves part of the latent unmasked
    latents, control = _run(bundle, inversion, [EditSpec(EDIT, 0.5)], blend_threshold=0.995)
    queries = min(control._maps, key=lambda q: abs(q - control.blend_pixels))
    side = int(queries**0.5)
    maps = control._maps[queries].view(2, side, side, -1)
    mask = control.local_blend.mask(maps, control.candidates, tuple(latents.shape[2:]))[0, 0]
    outside = ~mask
    assert outside.any(), "the blend mask should not cover the whole latent"
    assert torch.equal(latents[1][:, outside], latents[0][:, outside])
    assert (latents[1][:, mask] - latents[0][:, mask]).abs().max() > 0


def test_encode_latent_uses_the_posterior_mean(bundle):
    image = torch.rand(1, 1, bundle.resolution, bundle.resolution, generator=torch.Generator().manual_seed(2))
    a, b = encode_latent(bundle.vae, image), encode_latent(bundle.vae, image)
    assert torch.equal(a, b)
    assert a.shape == (1, 4, bundle.resolution // 8, bundle.resolution // 8)


def test_sweep_candidates_share_a_branch_until_their_self_attention_windows_end(bundle):
    image = torch.rand(1, 1, bundle.resolution, bundle.resolution, generator=torch.Generator().manual_seed(4))
    inversion = _setup(bundle, image)
    rows = []
    hook = bundle.unet.register_forward_hook(lambda module, args, output: rows.append(output.sample.shape[0]))
    try:
        latents, control = _run(bundle, inversion, [EditSpec(EDIT, v) for v in (0.25, 0.5, 0.75)])
    finally:
        hook.remove()
    # windows end at steps 2, 4 and 6 of 8: 1, 1, 2, 2, 3, 3, 3, 3 candidate branches plus the source, x2 for guidance
    assert rows == [2 * (1 + n) for n in (1, 1, 2, 2, 3, 3, 3, 3)]
    assert latents.shape[0] == 4 and control.groups == [[0], [1], [2]]
