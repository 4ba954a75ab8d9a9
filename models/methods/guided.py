"""Classifier-guided counterfactuals, after seed 003: a DDIM inversion of the input, then denoising
where at each step the predicted x̂0 (eq. 10) is decoded and passed to a finding classifier, and the
latent moves down the gradient of the target loss (eq. 11, removal: -log(1 - p); eq. 12,
synthesis: -log p) plus an L1 term between the decoded x̂0 and the input (eq. 15). With an
anatomy mask M (latent resolution, True = keep) the latent is blended at every step with the
input's latent noised to that step (eqs. 13, 14), and with the input's latent itself after the
last step, so the masked anatomy is the input's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from models.diffusion.components import decode_latents, embed_prompts, encode_latent
from models.diffusion.ddim import DDIMSampler
from models.diffusion.inversion import ddim_invert, predict_eps
from models.diffusion.packing import PackProgress, ProgressCallback
from models.imaging.geometry import to_model_input
from models.methods.base import Edit, RunContext, Source
from models.request.errors import InvalidInput
from models.request.report import Geometry

Decode = Callable[[torch.Tensor], torch.Tensor]


def target_loss(probabilities: Mapping[str, torch.Tensor], targets: Mapping[str, int]) -> torch.Tensor:
    """Eqs. 11 and 12, summed over the target findings."""
    terms = []
    for label, wanted in targets.items():
        p = probabilities[label].clamp(1e-6, 1 - 1e-6)
        terms.append(-torch.log(p) if wanted == 1 else -torch.log(1 - p))
    return torch.stack(terms).sum()


def guided_edit(
    *,
    unet,
    sampler: DDIMSampler,
    x_T: torch.Tensor,
    z0: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    decode: Decode,
    classify: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    targets: Mapping[str, int],
    image: torch.Tensor,
    classifier_weight: float,
    l1_weight: float,
    keep: torch.Tensor | None,
    generator: torch.Generator,
    callback: ProgressCallback | None = None,
) -> torch.Tensor:
    """The edited latent, from ``x_T`` (the input's DDIM inversion) under the edit prompt ``cond``."""
    x = x_T.float()
    context = torch.cat([uncond, cond])
    n = sampler.num_steps
    noises = None  # each step's noise drawn in the steps' order, moved to the device once
    if keep is not None and n > 1:
        noises = torch.stack([torch.randn(z0.shape, generator=generator) for _ in range(n - 1)]).to(z0.device)
    for i, (t, t_device) in enumerate(zip(sampler.timesteps, sampler.timestep_tensors(x.device), strict=True)):
        x = x.detach().requires_grad_(True)
        eps_uncond, eps_cond = predict_eps(unet, torch.cat([x, x]), t_device, context).float().chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        alpha = sampler.alpha(t)
        x0_hat = (x - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        decoded = decode(x0_hat)
        loss = classifier_weight * target_loss(classify(decoded), targets)
        loss = loss + l1_weight * (decoded - image).abs().mean()
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = sampler.step(eps, t, x - grad)
            if keep is not None:
                prev = t - sampler.stride
                if i + 1 < n:
                    a_prev = sampler.alpha(prev)
                    original = a_prev**0.5 * z0 + (1 - a_prev) ** 0.5 * noises[i]
                else:
                    original = z0
                x = torch.where(keep, original, x)
        if callback:
            callback("editing", i + 1, n)
    return x.detach()


def latent_mask(keep: np.ndarray, geometry: Geometry, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(1, 1, h, w) True where a latent cell touches any kept pixel (max-pooled, so no kept pixel
    falls in a cell the edit may change)."""
    square = to_model_input(keep.astype(np.float32), geometry.model_size)[0]
    pooled = F.adaptive_max_pool2d(square, latent_hw)
    return pooled > 0


class Guided:
    """One candidate by classifier guidance from the input's DDIM inversion; the reference latent
    is the input's own (its VAE reconstruction)."""

    name = "guided"

    def run(self, source: Source, context: RunContext) -> Edit:
        bundle, params, timer, classifier = context.bundle, context.params, context.timer, context.classifier
        if classifier is None:
            raise InvalidInput("method", "guided needs a finding classifier and none is configured (PRISM_CLASSIFIER)")
        targets = params.classifier_targets or {}
        if set(targets) - set(classifier.labels):
            raise InvalidInput(
                "classifier_targets", f"need findings the classifier knows ({', '.join(classifier.labels)})"
            )
        sampler = DDIMSampler(bundle.scheduler, params.steps)
        z0 = timer.measure("encode", lambda: encode_latent(bundle.vae, source.image))
        prompts = [source.original_prompt, source.edit_prompt, ""]
        original, edited, uncond = embed_prompts(bundle.text_encoder, bundle.tokenizer, prompts).chunk(3)
        keep = None
        if source.keep is not None:
            keep = latent_mask(source.keep, source.geometry, tuple(z0.shape[2:])).to(bundle.device)
        progress = PackProgress.single(context.progress)
        unet = bundle.inversion_unet
        latents = timer.measure("inversion", lambda: ddim_invert(unet, sampler, z0, original, progress))
        if progress.left:  # a run of one: the item's reason to leave ends it
            raise progress.left[0]
        classifier = classifier.to(bundle.device)
        latent = timer.measure(
            "editing",
            lambda: guided_edit(
                unet=bundle.unet,
                sampler=sampler,
                x_T=latents[-1],
                z0=z0,
                cond=edited,
                uncond=uncond,
                guidance_scale=params.guidance_scale,
                decode=lambda x0: decode_latents(bundle.vae, x0, grad=True),
                classify=classifier.probabilities,
                targets=targets,
                image=source.image.to(bundle.device),
                classifier_weight=params.classifier_weight,
                l1_weight=params.l1_weight,
                keep=keep,
                generator=torch.Generator().manual_seed(params.seed),
                callback=context.progress,
            ),
        )
        return Edit(torch.cat([z0, latent]), [source.edit_prompt], [None], anatomy_mask=keep is not None)
