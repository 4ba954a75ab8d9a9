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

import torch

from models.diffusion.ddim import DDIMSampler
from models.diffusion.inversion import ProgressCallback, _eps

Decode = Callable[[torch.Tensor], torch.Tensor]


def target_loss(probabilities: Mapping[str, torch.Tensor], targets: Mapping[str, int]) -> torch.Tensor:
    """Eqs. 11 and 12, summed over the target findings."""
    terms = []
    for label, wanted in targets.items():
        p = probabilities[label].clamp(1e-6, 1 - 1e-6)
        terms.append(-torch.log(p) if wanted == 1 else -torch.log(1 - p))
    return torch.stack(terms).sum()


def guided_edit(
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
    for i, t in enumerate(sampler.timesteps):
        x = x.detach().requires_grad_(True)
        eps_uncond, eps_cond = _eps(unet, torch.cat([x, x]), t, context).float().chunk(2)
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
                    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
                    original = a_prev**0.5 * z0 + (1 - a_prev) ** 0.5 * noise
                else:
                    original = z0
                x = torch.where(keep, original, x)
        if callback:
            callback("editing", i + 1, n)
    return x.detach()
