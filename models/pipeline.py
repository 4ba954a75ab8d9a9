"""The whole PRISM counterfactual: invert, edit (batched sweep), score, map back to the input.

Plain arrays in; plain arrays and a typed :class:`~models.report.EditReport` out; no HTTP, no queue.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.constants import TOKEN_WINDOW
from models.ddim import PRISM_SCHEDULER_CONFIG, DDIMSampler
from models.dicom import DicomSource, secondary_captures
from models.difference import difference, encode_rgb_png, render_difference
from models.editing import EditSpec, build_control, denoise, edit_specs
from models.geometry import DecodedImage, encode_png, from_model_output, quantize, to_model_input
from models.inversion import (
    Inversion,
    InversionCache,
    ProgressCallback,
    ddim_invert,
    direct_offsets,
    inversion_key,
    null_text_optimize,
)
from models.loading import ModelBundle
from models.params import EditParams
from models.report import CandidateScores, DifferenceInfo, EditReport, EditScores, Geometry, InversionInfo, ModelInfo
from models.scoring import ClipScorer, score_candidates
from models.validation import validate_request

SCORE_REFERENCE = "reconstruction"


@dataclass
class Counterfactual:
    """Outputs at the input's size, intensities in [0, 1], already quantized to ``bit_depth``."""

    original: np.ndarray
    counterfactual: np.ndarray
    reconstruction: np.ndarray
    difference: np.ndarray
    difference_rgb: np.ndarray
    bit_depth: int
    report: EditReport
    dicom: DicomSource | None = None

    def files(self) -> dict[str, bytes]:
        """The five result files by name, and for a DICOM input ``counterfactual.dcm`` and
        ``difference.dcm`` (Secondary Captures in the input's study)."""
        buf = io.BytesIO()
        np.save(buf, self.difference.astype(np.float32))
        files = {
            "counterfactual.png": encode_png(self.counterfactual, self.bit_depth),
            "reconstruction.png": encode_png(self.reconstruction, self.bit_depth),
            "difference.png": encode_rgb_png(self.difference_rgb),
            "difference.npy": buf.getvalue(),
            "result.json": self.report.model_dump_json(indent=2).encode(),
        }
        if self.dicom is not None:
            description = (
                f"PRISM counterfactual (S_CLIP {self.report.s_clip:.3f}): {self.report.original_prompt!r} "
                f"edited to {self.report.edit_prompt!r}"
            )
            files |= secondary_captures(self.dicom, self.counterfactual, self.difference_rgb, description)
        return files


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def measure(self, name: str, fn: Callable):
        start = time.perf_counter()
        result = fn()
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)
        return result


@torch.no_grad()
def encode_latent(bundle: ModelBundle, image: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean times the scaling factor, for a (1, 1, S, S) image in [0, 1].

    Grayscale is repeated over the VAE's input channels (3 for SD v1.5, 1 for the built-in model).
    """
    channels = bundle.vae.config.in_channels
    x = (image * 2 - 1).expand(-1, channels, -1, -1).to(bundle.device, bundle.vae.dtype)
    return bundle.vae.encode(x).latent_dist.mean.float() * bundle.latent_scale


@torch.no_grad()
def decode_latents(bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) latents -> (B, 1, S, S) grayscale in [0, 1]."""
    images = bundle.vae.decode((latents / bundle.latent_scale).to(bundle.vae.dtype)).sample.float()
    return ((images.mean(1, keepdim=True) + 1) / 2).clamp(0, 1)


@torch.no_grad()
def embed_prompts(bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
    tokens = bundle.tokenizer(
        prompts, padding="max_length", max_length=TOKEN_WINDOW, truncation=True, return_tensors="pt"
    )
    return bundle.text_encoder(tokens.input_ids.to(bundle.device))[0].float()


def invert(
    bundle: ModelBundle,
    image: torch.Tensor,
    original_prompt: str,
    params: EditParams,
    cache: InversionCache | None = None,
    callback: ProgressCallback | None = None,
    timer: _Timer | None = None,
) -> tuple[Inversion, bool]:
    """The inversion (``params.inversion`` mode) of a model-size image, from ``cache`` when every key
    part matches."""
    timer = timer or _Timer()
    mode = params.inversion
    key = inversion_key(
        image.numpy(),
        original_prompt,
        f"{bundle.identity}:{bundle.dtype}",
        dict(bundle.scheduler.config) | {"fixed": PRISM_SCHEDULER_CONFIG},
        params.steps,
        params.guidance_scale,
        params.null_text,
        mode,
    )
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit, True
    sampler = DDIMSampler(bundle.scheduler, params.steps)
    z0 = timer.measure("encode", lambda: encode_latent(bundle, image))
    cond, uncond = embed_prompts(bundle, [original_prompt, ""]).chunk(2)
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
        settings={"steps": params.steps, "guidance_scale": params.guidance_scale, "model": bundle.identity},
        losses=losses,
    )
    if cache is not None:
        cache.put(inversion)
    return inversion, False


def generate_counterfactual(
    bundle: ModelBundle,
    image: DecodedImage,
    original_prompt: str,
    edit_prompt: str,
    params: EditParams = EditParams(),
    cache: InversionCache | None = None,
    callback: ProgressCallback | None = None,
) -> Counterfactual:
    """PRISM: invert the image under ``original_prompt``, edit towards ``edit_prompt`` for each
    self_replace value in one batched pass, keep the candidate with the highest S_CLIP."""
    validate_request(bundle.tokenizer, original_prompt, edit_prompt, params)
    timer = _Timer()
    model_image, geometry = to_model_input(image.pixels, bundle.resolution)
    inversion, cached = invert(bundle, model_image, original_prompt, params, cache, callback, timer)

    specs = edit_specs(params, edit_prompt)
    sampler = DDIMSampler(bundle.scheduler, params.steps)
    latent_hw = tuple(inversion.x_T.shape[2:])
    control = build_control(
        bundle.tokenizer,
        original_prompt,
        specs,
        params.steps,
        latent_hw,
        params.blend_threshold,
        params.blend_start,
        bundle.blend_maps,
    )
    cond = embed_prompts(bundle, [original_prompt] + [s.edit_prompt for s in specs])
    latents = timer.measure(
        "editing",
        lambda: denoise(
            bundle.unet,
            sampler,
            inversion.x_T.to(bundle.device),
            inversion.uncond_embeddings,
            cond,
            params.guidance_scale,
            control,
            callback,
            inversion.latent_offsets,
        ),
    )
    images = timer.measure("decode", lambda: decode_latents(bundle, latents).cpu())
    regions = edited_regions(latents, bundle.resolution).cpu()
    if callback:
        callback("scoring", 0, 1)
    scorer = ClipScorer(bundle.clip, bundle.device)
    scores = timer.measure(
        "scoring",
        lambda: score_candidates(scorer, images[:1], images[1:], original_prompt, [s.edit_prompt for s in specs]),
    )
    best = max(range(len(scores)), key=lambda k: scores[k].s_clip)
    if callback:
        callback("scoring", 1, 1)
    return _assemble(
        image, geometry, images, regions, best, scores, specs, params, inversion, cached, bundle, timer, original_prompt
    )


def edited_regions(latents: torch.Tensor, size: int) -> torch.Tensor:
    """(K, size, size) in {0, 1}: where each candidate's final latent differs from the source's.

    LocalBlend keeps a candidate's latent bit-equal to the source's outside its mask, yet the
    VAE decoder's group normalisation spreads any local latent change over the whole decoded
    image. The residual output therefore adds the edit's effect only where the latent changed.
    """
    changed = (latents[1:] != latents[:1]).any(1, keepdim=True).float()
    return F.interpolate(changed, size=(size, size), mode="nearest")[:, 0]


def _assemble(
    image: DecodedImage,
    geometry: Geometry,
    images: torch.Tensor,
    regions: torch.Tensor,
    best: int,
    scores: list[EditScores],
    specs: list[EditSpec],
    params: EditParams,
    inversion: Inversion,
    cached: bool,
    bundle: ModelBundle,
    timer: _Timer,
    original_prompt: str,
) -> Counterfactual:
    edited = from_model_output(images[1 + best, 0], geometry)
    reconstructed = from_model_output(images[0, 0], geometry)
    region = from_model_output(regions[best], geometry)
    if params.output == "residual":
        edited = image.pixels + region * (edited - reconstructed)
    counterfactual = quantize(edited, image.bit_depth)
    reconstruction = quantize(reconstructed, image.bit_depth)
    diff = difference(counterfactual, image.pixels)
    diff_rgb, scale = render_difference(diff)
    chosen = scores[best]
    report = EditReport(
        s_clip=chosen.s_clip,
        passed=chosen.s_clip >= params.s_clip_threshold,
        s_clip_threshold=params.s_clip_threshold,
        similarities=chosen,
        score_reference=SCORE_REFERENCE,
        chosen_self_replace=specs[best].self_replace_steps,
        candidates=[
            CandidateScores(self_replace_steps=s.self_replace_steps, **sc.model_dump())
            for s, sc in zip(specs, scores, strict=True)
        ],
        timings=timer.timings,
        parameters=params,
        model=ModelInfo(
            identity=bundle.identity, resolution=bundle.resolution, device=str(bundle.device), dtype=str(bundle.dtype)
        ),
        geometry=geometry,
        bit_depth=image.bit_depth,
        input_format=image.format,
        original_prompt=original_prompt,
        edit_prompt=specs[best].edit_prompt,
        inversion=InversionInfo(
            mode=inversion.mode, key=inversion.key, cached=cached, final_losses=inversion.losses[-3:]
        ),
        edited_fraction=float(region.mean()),
        difference=DifferenceInfo(min=float(diff.min()), max=float(diff.max())),
        difference_png_scale=scale,
    )
    return Counterfactual(
        original=image.pixels,
        counterfactual=counterfactual,
        reconstruction=reconstruction,
        difference=diff,
        difference_rgb=diff_rgb,
        bit_depth=image.bit_depth,
        report=report,
        dicom=image.dicom,
    )
