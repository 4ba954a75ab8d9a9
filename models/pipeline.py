"""The whole PRISM counterfactual: invert, edit (batched sweep), score, map back to the input.

Plain arrays in; plain arrays and a typed :class:`~models.request.report.EditReport` out; no HTTP, no queue.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.diffusion.components import ModelBundle
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
from models.imaging.dicom import DicomSource, secondary_captures
from models.imaging.difference import difference, encode_rgb_png, render_difference
from models.imaging.geometry import DecodedImage, encode_png, from_model_output, quantize, to_model_input
from models.methods.guided import guided_edit
from models.methods.sdedit import sdedit
from models.request.constants import TOKEN_WINDOW
from models.request.errors import InvalidInput
from models.request.params import EditParams
from models.request.report import (
    CandidateScores,
    DifferenceInfo,
    EditReport,
    EditScores,
    Geometry,
    InversionInfo,
    ModelInfo,
)
from models.request.validation import validate_request
from models.scoring.classifier import FindingClassifier
from models.scoring.clip import ClipScorer, score_candidates

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
    """Seconds per phase; on CUDA the device is synchronised so a phase is charged its own kernels."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.timings: dict[str, float] = {}
        self.cuda = device is not None and device.type == "cuda"

    def measure(self, name: str, fn: Callable):
        start = time.perf_counter()
        result = fn()
        if self.cuda:
            torch.cuda.synchronize()
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


def decode_latents(bundle: ModelBundle, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """(B, 4, h, w) latents -> (B, 1, S, S) grayscale in [0, 1] (differentiable with ``grad``)."""
    with torch.set_grad_enabled(grad):
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
    timer = timer or _Timer(bundle.device)
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
        settings={"steps": params.steps, "guidance_scale": params.guidance_scale, "model": bundle.inversion_identity},
        losses=losses,
    )
    if cache is not None:
        cache.put(inversion)
    return inversion, False


@dataclass
class Edit:
    """What a method produced: latents [reference, candidate 1..K] and what it records."""

    latents: torch.Tensor
    edit_prompts: list[str]
    self_replace: list[float | None]
    inversion: InversionInfo | None = None
    anatomy_mask: bool = False
    blend_threshold: float | None = None


def generate_counterfactual(
    bundle: ModelBundle,
    image: DecodedImage,
    original_prompt: str,
    edit_prompt: str,
    params: EditParams = EditParams(),
    cache: InversionCache | None = None,
    callback: ProgressCallback | None = None,
    keep: np.ndarray | None = None,
    classifier: FindingClassifier | None = None,
) -> Counterfactual:
    """A counterfactual of ``image`` by ``params.method``, scored with S_CLIP against the
    reconstruction and mapped back to the input's geometry.

    ``prism``: invert under ``original_prompt``, edit towards ``edit_prompt`` for each self_replace
    value in one batched pass, keep the candidate with the highest S_CLIP. ``sdedit`` and
    ``guided`` make one candidate; ``guided`` needs a ``classifier`` and keeps the anatomy where
    ``keep`` (an image-sized mask, True = keep) is set.
    """
    validate_request(bundle.tokenizer, original_prompt, edit_prompt, params)
    if keep is not None and keep.shape != image.pixels.shape:
        raise InvalidInput("mask", f"the mask is {keep.shape[::-1]} pixels, the image {image.pixels.shape[::-1]}")
    timer = _Timer(bundle.device)
    model_image, geometry = to_model_input(image.pixels, bundle.resolution)
    if params.method == "prism":
        edit = _prism(bundle, model_image, original_prompt, edit_prompt, params, cache, callback, timer)
    else:
        edit = _one_candidate(
            bundle, model_image, geometry, original_prompt, edit_prompt, params, callback, timer, keep, classifier
        )
    images = timer.measure("decode", lambda: decode_latents(bundle, edit.latents).cpu())
    regions = edited_regions(edit.latents, bundle.resolution).cpu()
    if callback:
        callback("scoring", 0, 1)
    scorer = ClipScorer(bundle.clip, bundle.device)
    scores = timer.measure(
        "scoring", lambda: score_candidates(scorer, images[:1], images[1:], original_prompt, edit.edit_prompts)
    )
    best = max(range(len(scores)), key=lambda k: scores[k].s_clip)
    if callback:
        callback("scoring", 1, 1)
    return _assemble(image, geometry, images, regions, best, scores, edit, params, bundle, timer, original_prompt)


def _prism(
    bundle: ModelBundle,
    model_image: torch.Tensor,
    original_prompt: str,
    edit_prompt: str,
    params: EditParams,
    cache: InversionCache | None,
    callback: ProgressCallback | None,
    timer: _Timer,
) -> Edit:
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
        params.blend_edit_maps,
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
    info = InversionInfo(mode=inversion.mode, key=inversion.key, cached=cached, final_losses=inversion.losses[-3:])
    blend_threshold = next((c.blend_threshold for c in control.candidates if c.blends), None)
    prompts, self_replace = [s.edit_prompt for s in specs], [s.self_replace_steps for s in specs]
    return Edit(latents, prompts, self_replace, info, blend_threshold=blend_threshold)


def _one_candidate(
    bundle: ModelBundle,
    model_image: torch.Tensor,
    geometry: Geometry,
    original_prompt: str,
    edit_prompt: str,
    params: EditParams,
    callback: ProgressCallback | None,
    timer: _Timer,
    keep: np.ndarray | None,
    classifier: FindingClassifier | None,
) -> Edit:
    """``sdedit`` or ``guided``: the reference latent is the input's own (its VAE reconstruction)."""
    generator = torch.Generator().manual_seed(params.seed)
    sampler = DDIMSampler(bundle.scheduler, params.steps)
    z0 = timer.measure("encode", lambda: encode_latent(bundle, model_image))
    source, edited, uncond = embed_prompts(bundle, [original_prompt, edit_prompt, ""]).chunk(3)
    if params.method == "sdedit":
        latent = timer.measure(
            "editing",
            lambda: sdedit(
                bundle.unet, sampler, z0, edited, uncond, params.guidance_scale, params.strength, generator, callback
            ),
        )
        return Edit(torch.cat([z0, latent]), [edit_prompt], [None])
    if classifier is None:
        raise InvalidInput("method", "guided needs a finding classifier and none is configured (PRISM_CLASSIFIER)")
    targets = params.classifier_targets or {}
    missing = sorted(set(targets) - set(classifier.labels))
    if not targets or missing:
        raise InvalidInput("classifier_targets", f"need findings the classifier knows ({', '.join(classifier.labels)})")
    mask = None if keep is None else latent_mask(keep, geometry, tuple(z0.shape[2:])).to(bundle.device)
    latents = timer.measure("inversion", lambda: ddim_invert(bundle.unet, sampler, z0, source, callback))
    classifier = classifier.to(bundle.device)
    latent = timer.measure(
        "editing",
        lambda: guided_edit(
            bundle.unet,
            sampler,
            latents[-1],
            z0,
            edited,
            uncond,
            params.guidance_scale,
            lambda x0: decode_latents(bundle, x0, grad=True),
            classifier.probabilities,
            targets,
            model_image.to(bundle.device),
            params.classifier_weight,
            params.l1_weight,
            mask,
            generator,
            callback,
        ),
    )
    return Edit(torch.cat([z0, latent]), [edit_prompt], [None], anatomy_mask=mask is not None)


def latent_mask(keep: np.ndarray, geometry: Geometry, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(1, 1, h, w) True where a latent cell touches any kept pixel (max-pooled, so no kept pixel
    falls in a cell the edit may change)."""
    square = to_model_input(keep.astype(np.float32), geometry.model_size)[0]
    pooled = F.adaptive_max_pool2d(square, latent_hw)
    return pooled > 0


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
    edit: Edit,
    params: EditParams,
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
        method=params.method,
        s_clip=chosen.s_clip,
        passed=chosen.s_clip >= params.s_clip_threshold,
        s_clip_threshold=params.s_clip_threshold,
        similarities=chosen,
        score_reference=SCORE_REFERENCE,
        chosen_self_replace=edit.self_replace[best],
        candidates=[
            CandidateScores(self_replace_steps=s, **sc.model_dump())
            for s, sc in zip(edit.self_replace, scores, strict=True)
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
        edit_prompt=edit.edit_prompts[best],
        inversion=edit.inversion,
        anatomy_mask=edit.anatomy_mask,
        blend_threshold=edit.blend_threshold,
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
