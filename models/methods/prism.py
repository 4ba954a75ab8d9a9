"""PRISM's method: invert the image under the original prompt (``params.inversion``: null-text,
negative-prompt or direct), then edit towards the edit prompt with prompt-to-prompt attention
control, every ``self_replace_steps`` value of the sweep as one candidate of one batched pass."""

from __future__ import annotations

import torch

from models.diffusion.components import ModelBundle, embed_prompts, encode_latent
from models.diffusion.ddim import PRISM_SCHEDULER_CONFIG, DDIMSampler
from models.diffusion.editing import build_control, denoise, edit_specs
from models.diffusion.inversion import (
    Inversion,
    InversionCache,
    ProgressCallback,
    ddim_invert,
    direct_offsets,
    inversion_key,
    null_text_optimize,
)
from models.methods.base import Edit, PhaseTimer, RunContext, Source
from models.request.params import EditParams
from models.request.report import InversionInfo


def invert(
    bundle: ModelBundle,
    image: torch.Tensor,
    original_prompt: str,
    params: EditParams,
    cache: InversionCache | None = None,
    callback: ProgressCallback | None = None,
    timer: PhaseTimer | None = None,
) -> tuple[Inversion, bool]:
    """The inversion (``params.inversion`` mode) of a model-size image, from ``cache`` when every key
    part matches; and whether it came from the cache."""
    timer = timer or PhaseTimer(bundle.device)
    mode = params.inversion
    key = inversion_key(
        image.numpy(),
        original_prompt,
        f"{bundle.inversion_identity}:{bundle.dtype}",
        dict(bundle.scheduler.config) | {"fixed": PRISM_SCHEDULER_CONFIG},
        params.steps,
        params.guidance_scale,
        params.null_text,
        mode,
    )
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit, True
    sampler = DDIMSampler(bundle.scheduler, params.steps)
    z0 = timer.measure("encode", lambda: encode_latent(bundle.vae, image))
    cond, uncond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [original_prompt, ""]).chunk(2)
    latents = timer.measure("inversion", lambda: ddim_invert(bundle.unet, sampler, z0, cond, callback))
    offsets, losses = None, []
    if mode == "null_text":
        embeddings, losses = timer.measure(
            "null_text",
            lambda: null_text_optimize(
                bundle.unet, sampler, latents, cond, uncond, params.guidance_scale, params.null_text, callback
            ),
        )
    elif mode == "negative_prompt":
        embeddings = cond.cpu().expand(params.steps, -1, -1).clone()
    else:
        embeddings = uncond.cpu().expand(params.steps, -1, -1).clone()
        offsets = timer.measure(
            "offsets",
            lambda: direct_offsets(bundle.unet, sampler, latents, cond, uncond, params.guidance_scale, callback),
        )
    inversion = Inversion(
        x_T=latents[-1].cpu(),
        uncond_embeddings=embeddings,
        key=key,
        mode=mode,
        latent_offsets=offsets,
        settings={"steps": params.steps, "guidance_scale": params.guidance_scale, "model": bundle.inversion_identity},
        losses=losses,
    )
    if cache is not None:
        cache.put(inversion)
    return inversion, False


class Prism:
    """The reference latent is the source branch of the same pass (the reconstruction); one
    candidate per ``self_replace_steps`` value."""

    name = "prism"

    def run(self, source: Source, context: RunContext) -> Edit:
        bundle, params, timer = context.bundle, context.params, context.timer
        inversion, cached = invert(
            bundle, source.image, source.original_prompt, params, context.cache, context.progress, timer
        )
        specs = edit_specs(params, source.edit_prompt)
        control = build_control(
            tokenizer=bundle.tokenizer,
            source_prompt=source.original_prompt,
            specs=specs,
            num_steps=params.steps,
            latent_hw=tuple(inversion.x_T.shape[2:]),
            blend_threshold=params.blend_threshold,
            blend_start=params.blend_start,
            blend_maps=bundle.blend_maps,
            blend_edit_maps=params.blend_edit_maps,
        )
        prompts = [source.original_prompt] + [s.edit_prompt for s in specs]
        cond = embed_prompts(bundle.text_encoder, bundle.tokenizer, prompts)
        latents = timer.measure(
            "editing",
            lambda: denoise(
                unet=bundle.unet,
                sampler=DDIMSampler(bundle.scheduler, params.steps),
                x_T=inversion.x_T.to(bundle.device),
                uncond_embeddings=inversion.uncond_embeddings,
                cond_embeddings=cond,
                guidance_scale=params.guidance_scale,
                control=control,
                callback=context.progress,
                latent_offsets=inversion.latent_offsets,
            ),
        )
        info = InversionInfo(mode=inversion.mode, key=inversion.key, cached=cached, final_losses=inversion.losses[-3:])
        return Edit(
            latents,
            [s.edit_prompt for s in specs],
            [s.self_replace_steps for s in specs],
            info,
            blend_threshold=next((c.blend_threshold for c in control.candidates if c.blends), None),
        )
