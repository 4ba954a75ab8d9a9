"""Prompt-to-prompt editing: one batched denoising pass for a source and K edit candidates.

Each candidate is an (edit prompt, self_replace_steps) pair, so several edit prompts and the
PRISM sweep of self_replace_steps share the source branch and one UNet call per step; the passes
of several images (a worker's pack of jobs) share the UNet calls too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from models.diffusion.attention_control import (
    P2P_BLEND_MAPS,
    BlendMaps,
    CandidateControl,
    ControlledAttnProcessor,
    LocalBlend,
    PromptToPromptControl,
    StackedControl,
)
from models.diffusion.ddim import DDIMSampler
from models.diffusion.packing import PackProgress
from models.diffusion.token_maps import refinement_mapper, replacement_mapper
from models.request.constants import TOKEN_WINDOW
from models.request.params import BlendEditMaps, EditParams
from models.request.words import edit_words, word_token_indices

DEFAULTS = EditParams()


@dataclass(frozen=True)
class EditSpec:
    """One edit candidate. ``None`` word lists default to the words that differ between prompts."""

    edit_prompt: str
    self_replace_steps: float
    cross_replace_steps: float = DEFAULTS.cross_replace_steps
    edit_word_weight: float = DEFAULTS.edit_word_weight
    reweight_words: tuple[str, ...] | None = None
    blend_words: tuple[str, ...] | None = None
    local_blend: bool = DEFAULTS.local_blend


def edit_specs(params: EditParams, edit_prompt: str) -> list[EditSpec]:
    """One candidate per self_replace value of the PRISM sweep."""
    return [
        EditSpec(
            edit_prompt=edit_prompt,
            self_replace_steps=v,
            cross_replace_steps=params.cross_replace_steps,
            edit_word_weight=params.edit_word_weight,
            reweight_words=params.reweight_words,
            blend_words=params.blend_words,
            local_blend=params.local_blend,
        )
        for v in params.self_replace_steps
    ]


def candidate_control(
    tokenizer,
    source_prompt: str,
    spec: EditSpec,
    blend_threshold: float | None = None,
    blend_maps: BlendMaps = P2P_BLEND_MAPS,
) -> CandidateControl:
    """Token mappings and weights of one candidate; raises :class:`InvalidInput` for bad words.

    Its LocalBlend cut is ``blend_threshold`` when given, else the model's for its blend words."""
    words = edit_words(source_prompt, spec.edit_prompt, spec.reweight_words, spec.blend_words)
    same_length = len(source_prompt.split()) == len(spec.edit_prompt.split())
    control = CandidateControl(
        cross_replace_steps=spec.cross_replace_steps,
        self_replace_steps=spec.self_replace_steps,
        shared=replace(spec, self_replace_steps=0.0),
    )
    if same_length:
        control.mapper = replacement_mapper(tokenizer, source_prompt, spec.edit_prompt)
    else:
        control.refine_index, control.refine_alpha = refinement_mapper(tokenizer, source_prompt, spec.edit_prompt)

    if words.reweight and spec.edit_word_weight != 1.0:
        equalizer = torch.ones(TOKEN_WINDOW)
        indices = word_token_indices(tokenizer, spec.edit_prompt, words.reweight, "reweight_words")
        equalizer[indices] = spec.edit_word_weight
        control.equalizer = equalizer

    if spec.local_blend:
        control.blend_source_tokens = word_token_indices(tokenizer, source_prompt, words.blend_source, "blend_words")
        control.blend_tokens = word_token_indices(tokenizer, spec.edit_prompt, words.blend_edit, "blend_words")
        control.blend_threshold = (
            blend_threshold
            if blend_threshold is not None
            else blend_maps.threshold_for(words.blend_source + words.blend_edit)
        )
    return control


def build_control(
    tokenizer,
    source_prompt: str,
    specs: Sequence[EditSpec],
    num_steps: int,
    latent_hw: tuple[int, int],
    blend_threshold: float | None = DEFAULTS.blend_threshold,
    blend_start: float = DEFAULTS.blend_start,
    blend_maps: BlendMaps = P2P_BLEND_MAPS,
    blend_edit_maps: BlendEditMaps = DEFAULTS.blend_edit_maps,
) -> PromptToPromptControl:
    """The control of a batch of candidates; ``blend_threshold`` None cuts each candidate's mask
    where ``blend_maps`` says for its blend words."""
    candidates = [candidate_control(tokenizer, source_prompt, spec, blend_threshold, blend_maps) for spec in specs]
    blends = any(c.blends for c in candidates)
    blend = LocalBlend(blend_start, blend_maps, blend_edit_maps) if blends else None
    return PromptToPromptControl(candidates, num_steps, latent_hw, blend)


@dataclass
class DenoisePass:
    """One image's guided DDIM sampling: its branches (source, candidates) from one x_T.

    ``uncond_embeddings`` (steps, 77, D) are the unconditional embeddings of each step and
    ``cond_embeddings`` (branches, 77, D) the prompts. With a ``control`` the candidates run as the
    control's shared branches, forked when their edits part. ``latent_offsets`` (steps, 1, C, h, w),
    from a direct inversion, are added to the source branch after each step, before LocalBlend.
    """

    x_T: torch.Tensor
    uncond_embeddings: torch.Tensor
    cond_embeddings: torch.Tensor
    control: PromptToPromptControl | None = None
    latent_offsets: torch.Tensor | None = None

    def to(self, device: torch.device) -> DenoisePass:
        """The pass with its tensors (and its control's) on ``device``; the offsets in fp32."""
        if self.control is not None:
            self.control.to(device)
        offsets = None if self.latent_offsets is None else self.latent_offsets.to(device, torch.float32)
        return replace(
            self,
            x_T=self.x_T.to(device),
            uncond_embeddings=self.uncond_embeddings.to(device),
            cond_embeddings=self.cond_embeddings.to(device),
            latent_offsets=offsets,
        )

    def rows(self) -> list[int]:
        """For each branch running now, its prompt's row in ``cond_embeddings``."""
        return self.control.branch_rows() if self.control is not None else list(range(self.cond_embeddings.shape[0]))


@torch.no_grad()
def denoise(
    unet,
    sampler: DDIMSampler,
    passes: Sequence[DenoisePass],
    guidance_scale: float,
    progress: PackProgress | None = None,
    fused: bool = True,
) -> list[torch.Tensor]:
    """Several images' guided DDIM sampling as one batch: every UNet call takes all their branches,
    ``[uncond of pass 1..P, cond of pass 1..P]``. Returns each pass's final latents (source,
    candidates in the order of its ``cond_embeddings``), for the passes whose item did not leave
    ``progress``.

    With controls the UNet's attention processors are swapped for controlled ones for the call
    (``fused``: fused attention wherever no control reads probabilities) and restored after it.
    Each pass's embeddings, offsets and control go to the device once, before the first step.
    """
    device = passes[0].x_T.device
    passes = [p.to(device) for p in passes]
    rows = [p.rows() for p in passes]
    xs = [p.x_T.float().expand(len(r), *p.x_T.shape[1:]).clone() for p, r in zip(passes, rows, strict=True)]
    conds = [p.cond_embeddings[r] for p, r in zip(passes, rows, strict=True)]
    stacked = StackedControl()
    original = unet.attn_processors
    if any(p.control is not None for p in passes):
        unet.set_attn_processor(ControlledAttnProcessor(stacked, fused))
    try:
        for i, (t, t_device) in enumerate(zip(sampler.timesteps, sampler.timestep_tensors(device), strict=True)):
            for k, p in enumerate(passes):
                if p.control is not None:
                    p.control.step = i
                    if (parents := p.control.fork(i)) is not None:
                        rows[k] = p.control.branch_rows()
                        xs[k], conds[k] = xs[k][parents], p.cond_embeddings[rows[k]]
            sizes = [len(r) for r in rows]
            stacked.controls, stacked.sizes = [p.control for p in passes], sizes
            uncond = torch.cat([p.uncond_embeddings[i].expand(n, -1, -1) for p, n in zip(passes, sizes, strict=True)])
            x = torch.cat(xs)
            context = torch.cat([uncond, *conds]).to(unet.dtype)
            eps = unet(torch.cat([x, x]).to(unet.dtype), t_device, encoder_hidden_states=context).sample.float()
            eps_uncond, eps_cond = eps.chunk(2)
            xs = list(sampler.step(eps_uncond + guidance_scale * (eps_cond - eps_uncond), t, x).split(sizes))
            for k, p in enumerate(passes):
                if p.latent_offsets is not None:
                    xs[k] = torch.cat([xs[k][:1] + p.latent_offsets[i], xs[k][1:]])
                if p.control is not None:
                    xs[k] = p.control.after_step(xs[k])
            if progress is not None and (stay := progress.report("editing", i + 1, sampler.num_steps)) is not None:
                passes, rows, xs = [passes[k] for k in stay], [rows[k] for k in stay], [xs[k] for k in stay]
                conds = [conds[k] for k in stay]
                if not passes:
                    break
    finally:
        unet.set_attn_processor(original)
    return [p.control.per_candidate(x) if p.control is not None else x for p, x in zip(passes, xs, strict=True)]
