"""Deterministic DDIM steps in both directions, on plain float tensors.

Kept separate from diffusers' scheduler so that inversion and sampling use the exact same
alpha schedule and formulas, and so the arithmetic can be tested against analytic predictors.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

PRISM_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def make_scheduler(config: dict | None = None) -> DDIMScheduler:
    """A DDIM scheduler with PRISM's fixed settings; betas come from ``config`` when given."""
    merged = dict(PRISM_SCHEDULER_CONFIG)
    for name in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
        if config and name in config:
            merged[name] = config[name]
    return DDIMScheduler(**merged)


class DDIMSampler:
    """DDIM with ``num_steps`` steps; ``timesteps`` run from noisy to clean."""

    def __init__(self, scheduler: DDIMScheduler, num_steps: int) -> None:
        scheduler.set_timesteps(num_steps)
        self.num_steps = num_steps
        self.timesteps: list[int] = [int(t) for t in scheduler.timesteps]
        self.stride = scheduler.config.num_train_timesteps // num_steps
        self._alphas = scheduler.alphas_cumprod.to(torch.float64)
        self._final_alpha = float(scheduler.final_alpha_cumprod)

    def timestep_tensors(self, device: torch.device) -> list[torch.Tensor]:
        """``timesteps`` as 0-d tensors on ``device``, made with one copy: a loop that passes the UNet
        a fresh tensor (or a Python int, which the UNet makes into one) at every call copies from
        the host each time, which waits for the device."""
        return [t.clone() for t in torch.tensor(self.timesteps, device=device).unbind()]

    def alpha(self, t: int) -> float:
        return float(self._alphas[t]) if t >= 0 else self._final_alpha

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """Denoise ``x`` from timestep ``t`` to ``t - stride``."""
        a_t, a_prev = self.alpha(t), self.alpha(t - self.stride)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps

    def invert_step(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """Noise ``x`` from timestep ``t - stride`` up to ``t`` (eps evaluated at ``t``)."""
        a_prev, a_t = self.alpha(t - self.stride), self.alpha(t)
        x0 = (x - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
        return a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps
