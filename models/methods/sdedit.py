"""SDEdit-style image-to-image, the counterfactual of seed 004 (latent diffusion visual attribution):
noise the input's latent to ``strength`` of the schedule, then denoise it under the edit prompt
with classifier-free guidance. Strength 0 returns the input's latent unchanged (its VAE
reconstruction); 1 starts from almost pure noise.
"""

from __future__ import annotations

import torch

from models.diffusion.components import embed_prompts, encode_latent
from models.diffusion.ddim import DDIMSampler
from models.diffusion.inversion import eps_fp32
from models.diffusion.packing import ProgressCallback
from models.methods.base import Edit, RunContext, Source


@torch.no_grad()
def sdedit(
    *,
    unet,
    sampler: DDIMSampler,
    z0: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    strength: float,
    generator: torch.Generator,
    callback: ProgressCallback | None = None,
) -> torch.Tensor:
    """The edited latent; the last ``round(strength * steps)`` DDIM steps run, as diffusers' img2img."""
    steps = int(round(strength * sampler.num_steps))
    if steps == 0:
        return z0.float()
    start = sampler.num_steps - steps
    timesteps = sampler.timesteps[start:]
    alpha = sampler.alpha(timesteps[0])
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    x = alpha**0.5 * z0.float() + (1 - alpha) ** 0.5 * noise
    context = torch.cat([uncond, cond])
    for i, (t, t_device) in enumerate(zip(timesteps, sampler.timestep_tensors(z0.device)[start:], strict=True)):
        eps_uncond, eps_cond = eps_fp32(unet, torch.cat([x, x]), t_device, context).chunk(2)
        x = sampler.step(eps_uncond + guidance_scale * (eps_cond - eps_uncond), t, x)
        if callback:
            callback("editing", i + 1, steps)
    return x


class SDEdit:
    """One candidate; the reference latent is the input's own (its VAE reconstruction)."""

    name = "sdedit"

    def run(self, source: Source, context: RunContext) -> Edit:
        bundle, params, timer = context.bundle, context.params, context.timer
        z0 = timer.measure("encode", lambda: encode_latent(bundle.vae, source.image))
        prompts = [source.original_prompt, source.edit_prompt, ""]
        _, edited, uncond = embed_prompts(bundle.text_encoder, bundle.tokenizer, prompts).chunk(3)
        latent = timer.measure(
            "editing",
            lambda: sdedit(
                unet=bundle.unet,
                sampler=DDIMSampler(bundle.scheduler, params.steps),
                z0=z0,
                cond=edited,
                uncond=uncond,
                guidance_scale=params.guidance_scale,
                strength=params.strength,
                generator=torch.Generator().manual_seed(params.seed),
                callback=context.progress,
            ),
        )
        return Edit(torch.cat([z0, latent]), [source.edit_prompt], [None])
