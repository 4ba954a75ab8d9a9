"""PRISM's method: invert the image under the original prompt (``params.inversion``: null-text,
negative-prompt or direct), then edit towards the edit prompt with prompt-to-prompt attention
control, every ``self_replace_steps`` value of the sweep as one candidate of one batched pass.

Several images (a worker's pack of jobs with the same :meth:`Prism.pack_key`) run as one pack: their
DDIM inversions, null-text optimisations (one embedding and one early stop per image) and edits
share every UNet call, while each keeps its own prompts, sweep, words, progress and cache entry.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from models.diffusion.components import ModelBundle, embed_prompts, encode_latent
from models.diffusion.ddim import PRISM_SCHEDULER_CONFIG, DDIMSampler
from models.diffusion.editing import DenoisePass, build_control, denoise, edit_specs
from models.diffusion.inversion import (
    Inversion,
    InversionCache,
    ddim_invert,
    direct_offsets,
    inversion_key,
    null_text_optimize,
)
from models.diffusion.packing import PackProgress
from models.methods.base import Edit, PhaseTimer, RunContext, Source, measure_all
from models.request.errors import InvalidInput
from models.request.params import EditParams
from models.request.report import InversionInfo


def invert(
    bundle: ModelBundle,
    images: Sequence[torch.Tensor],
    prompts: Sequence[str],
    params: EditParams,
    cache: InversionCache | None = None,
    progress: PackProgress | None = None,
    timers: Sequence[PhaseTimer] | None = None,
) -> dict[int, tuple[Inversion, bool]]:
    """The inversions (``params.inversion`` mode) of model-size images (1, 1, S, S) under their
    prompts, by item, with whether each came from ``cache`` (a hit needs every key part to match).
    The images the cache lacks are inverted as one batch; items that leave ``progress`` are absent."""
    progress = progress or PackProgress([None] * len(images))
    timers = timers or [PhaseTimer(bundle.device) for _ in images]
    mode = params.inversion
    identity = f"{bundle.inversion_identity}:{bundle.dtype}"
    scheduler = dict(bundle.scheduler.config) | {"fixed": PRISM_SCHEDULER_CONFIG}
    out: dict[int, tuple[Inversion, bool]] = {}
    keys: dict[int, str] = {}
    for item in progress.alive:
        keys[item] = inversion_key(
            images[item].numpy(),
            prompts[item],
            identity,
            scheduler,
            params.steps,
            params.guidance_scale,
            params.null_text,
            mode,
        )
        if cache is not None and (hit := cache.get(keys[item])) is not None:
            out[item] = hit, True
    misses = progress.subset([item for item in progress.alive if item not in out])
    if not misses.alive:
        return out
    unet = bundle.inversion_unet
    missing = misses.alive
    clock = [timers[item] for item in missing]
    sampler = DDIMSampler(bundle.scheduler, params.steps)
    z0 = measure_all(clock, "encode", lambda: encode_latent(bundle.vae, torch.cat([images[i] for i in missing])))
    embedded = embed_prompts(bundle.text_encoder, bundle.tokenizer, [prompts[i] for i in missing] + [""])
    cond, uncond = embedded[:-1], embedded[-1:]
    latents = measure_all(clock, "inversion", lambda: ddim_invert(unet, sampler, z0, cond, misses))
    inverted = misses.alive  # the items of the latents' rows (and of cond's from here on)
    if not inverted:  # every item the cache lacked left during the inversion
        return {item: out[item] for item in progress.alive}
    cond = cond[[missing.index(i) for i in inverted]]
    losses: list[list[float]] = [[] for _ in inverted]
    offsets = None
    if mode == "null_text":
        embeddings, losses = measure_all(
            clock,
            "null_text",
            lambda: null_text_optimize(
                unet, sampler, latents, cond, uncond, params.guidance_scale, params.null_text, misses
            ),
        )
    else:
        if mode == "direct":
            offsets = measure_all(
                clock,
                "offsets",
                lambda: direct_offsets(unet, sampler, latents, cond, uncond, params.guidance_scale, misses),
            )
        unconditional = cond if mode == "negative_prompt" else uncond.expand(len(inverted), -1, -1)
        kept = [inverted.index(i) for i in misses.alive]
        embeddings = unconditional.cpu()[kept][:, None].expand(-1, params.steps, -1, -1).clone()
    settings = {"steps": params.steps, "guidance_scale": params.guidance_scale, "model": bundle.inversion_identity}
    for row, item in enumerate(misses.alive):
        inversion = Inversion(
            x_T=latents[-1][inverted.index(item)][None].cpu(),
            uncond_embeddings=embeddings[row],
            key=keys[item],
            mode=mode,
            latent_offsets=None if offsets is None else offsets[:, row : row + 1],
            settings=settings,
            losses=losses[row],
        )
        if cache is not None:
            cache.put(inversion)
        out[item] = inversion, False
    return {item: out[item] for item in progress.alive}


class Prism:
    """The reference latent is the source branch of the same pass (the reconstruction); one
    candidate per ``self_replace_steps`` value."""

    name = "prism"

    def pack_key(self, params: EditParams) -> Hashable:
        """Edits with equal keys can share a pack: the same inversion mode, schedule, guidance and
        null-text settings, so that every loop runs the same steps for all of them (the model and
        its size are the worker's own). Prompts, sweeps, words, thresholds and outputs may differ."""
        return (params.inversion, params.steps, params.guidance_scale, params.null_text)

    def run_pack(
        self, sources: Sequence[Source], contexts: Sequence[RunContext], progress: PackProgress
    ) -> dict[int, Edit]:
        """The edits of the items still in ``progress``, by item; the contexts share their bundle,
        cache and :meth:`pack_key`. An item whose words cannot be mapped leaves with its error."""
        first = contexts[progress.alive[0]]
        bundle, params = first.bundle, first.params
        if len({self.pack_key(contexts[i].params) for i in progress.alive}) > 1:
            raise ValueError("edits of different inversion, steps, guidance or null-text settings share a pack")
        timers = [c.timer for c in contexts]
        inversions = invert(
            bundle,
            [s.image for s in sources],
            [s.original_prompt for s in sources],
            params,
            first.cache,
            progress,
            timers,
        )
        passes, specs, controls = {}, {}, {}
        for item, (inversion, _) in inversions.items():
            source, item_params = sources[item], contexts[item].params
            specs[item] = edit_specs(item_params, source.edit_prompt)
            try:
                controls[item] = build_control(
                    tokenizer=bundle.tokenizer,
                    source_prompt=source.original_prompt,
                    specs=specs[item],
                    num_steps=params.steps,
                    latent_hw=tuple(inversion.x_T.shape[2:]),
                    blend_threshold=item_params.blend_threshold,
                    blend_start=item_params.blend_start,
                    blend_maps=bundle.blend_maps,
                    blend_edit_maps=item_params.blend_edit_maps,
                )
            except InvalidInput as exc:
                progress.fail(item, exc)
                continue
            prompts = [source.original_prompt] + [s.edit_prompt for s in specs[item]]
            passes[item] = DenoisePass(
                x_T=inversion.x_T.to(bundle.device),
                uncond_embeddings=inversion.uncond_embeddings,
                cond_embeddings=embed_prompts(bundle.text_encoder, bundle.tokenizer, prompts),
                control=controls[item],
                latent_offsets=inversion.latent_offsets,
            )
        editing = progress.subset(list(passes))
        if not editing.alive:
            return {}
        sampler = DDIMSampler(bundle.scheduler, params.steps)
        latents = measure_all(
            [timers[i] for i in editing.alive],
            "editing",
            lambda: denoise(bundle.unet, sampler, [passes[i] for i in editing.alive], params.guidance_scale, editing),
        )
        edits = {}
        for item, item_latents in zip(editing.alive, latents, strict=True):
            inversion, cached = inversions[item]
            info = InversionInfo(
                mode=inversion.mode, key=inversion.key, cached=cached, final_losses=inversion.losses[-3:]
            )
            edits[item] = Edit(
                item_latents,
                [s.edit_prompt for s in specs[item]],
                [s.self_replace_steps for s in specs[item]],
                info,
                blend_threshold=next((c.blend_threshold for c in controls[item].candidates if c.blends), None),
            )
        return edits
