"""Prompt-to-prompt editing: one batched denoising pass for a source and K edit candidates.

Each candidate is an (edit prompt, self_replace_steps) pair, so several edit prompts and the
PRISM sweep of self_replace_steps share the source branch and one UNet call per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.attention_control import (
    P2P_BLEND_MAPS,
    BlendMaps,
    CandidateControl,
    ControlledAttnProcessor,
    LocalBlend,
    PromptToPromptControl,
)
from models.ddim import DDIMSampler
from models.errors import InvalidInput
from models.inversion import ProgressCallback
from models.params import EditParams
from models.token_maps import refinement_mapper, replacement_mapper
from models.words import differing_words, prompt_words, word_token_indices


@dataclass(frozen=True)
class EditSpec:
    """One edit candidate. ``None`` word lists default to the words that differ between prompts."""

    edit_prompt: str
    self_replace_steps: float
    cross_replace_steps: float = 0.8
    edit_word_weight: float = 2.0
    reweight_words: tuple[str, ...] | None = None
    blend_words: tuple[str, ...] | None = None
    local_blend: bool = True


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


def _words_in(prompt: str, words: Sequence[str]) -> list[str]:
    present = set(prompt_words(prompt))
    return [w for entry in words for w in prompt_words(entry) if w in present]


def candidate_control(tokenizer, source_prompt: str, spec: EditSpec) -> CandidateControl:
    """Token mappings and weights of one candidate; raises :class:`InvalidInput` for bad words."""
    removed, added = differing_words(source_prompt, spec.edit_prompt)
    same_length = len(source_prompt.split()) == len(spec.edit_prompt.split())
    control = CandidateControl(cross_replace_steps=spec.cross_replace_steps, self_replace_steps=spec.self_replace_steps)
    if same_length:
        control.mapper = replacement_mapper(tokenizer, source_prompt, spec.edit_prompt)
    else:
        control.refine_index, control.refine_alpha = refinement_mapper(tokenizer, source_prompt, spec.edit_prompt)

    reweight = list(spec.reweight_words) if spec.reweight_words is not None else added
    if reweight and spec.edit_word_weight != 1.0:
        equalizer = torch.ones(77)
        equalizer[word_token_indices(tokenizer, spec.edit_prompt, reweight, "reweight_words")] = spec.edit_word_weight
        control.equalizer = equalizer

    if spec.local_blend:
        if spec.blend_words is not None:
            for word in (w for entry in spec.blend_words for w in prompt_words(entry)):
                if not _words_in(source_prompt, [word]) and not _words_in(spec.edit_prompt, [word]):
                    raise InvalidInput("blend_words", f"word {word!r} occurs in neither prompt")
            source_words = _words_in(source_prompt, spec.blend_words)
            edit_words = _words_in(spec.edit_prompt, spec.blend_words)
        else:
            source_words, edit_words = removed, added
        control.blend_source_tokens = word_token_indices(tokenizer, source_prompt, source_words, "blend_words")
        control.blend_tokens = word_token_indices(tokenizer, spec.edit_prompt, edit_words, "blend_words")
    return control


def build_control(
    tokenizer,
    source_prompt: str,
    specs: Sequence[EditSpec],
    num_steps: int,
    latent_hw: tuple[int, int],
    blend_threshold: float = 0.3,
    blend_start: float = 0.2,
    blend_maps: BlendMaps = P2P_BLEND_MAPS,
) -> PromptToPromptControl:
    candidates = [candidate_control(tokenizer, source_prompt, spec) for spec in specs]
    blend = LocalBlend(blend_threshold, blend_start, blend_maps) if any(c.blends for c in candidates) else None
    return PromptToPromptControl(candidates, num_steps, latent_hw, blend)


@torch.no_grad()
def denoise(
    unet,
    sampler: DDIMSampler,
    x_T: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    cond_embeddings: torch.Tensor,
    guidance_scale: float,
    control: PromptToPromptControl | None = None,
    callback: ProgressCallback | None = None,
) -> torch.Tensor:
    """Guided DDIM sampling of B = len(cond_embeddings) branches from one x_T.

    ``uncond_embeddings`` (steps, 77, D) are the null-text embeddings of each step. With a
    ``control`` the UNet's attention processors are swapped for controlled ones for the pass.
    """
    batch = cond_embeddings.shape[0]
    dtype, device = unet.dtype, x_T.device
    x = x_T.float().expand(batch, *x_T.shape[1:]).clone()
    original = unet.attn_processors
    if control is not None:
        unet.set_attn_processor(ControlledAttnProcessor(control))
    try:
        for i, t in enumerate(sampler.timesteps):
            uncond = uncond_embeddings[i].to(device).expand(batch, -1, -1)
            context = torch.cat([uncond, cond_embeddings.to(device)])
            if control is not None:
                control.step = i
            eps = unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()
            eps_uncond, eps_cond = eps.chunk(2)
            x = sampler.step(eps_uncond + guidance_scale * (eps_cond - eps_uncond), t, x)
            if control is not None:
                x = control.after_step(x)
            if callback:
                callback("editing", i + 1, sampler.num_steps)
    finally:
        unet.set_attn_processor(original)
    return x
