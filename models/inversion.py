"""DDIM inversion and null-text optimisation (Mokady et al.), as PRISM/LANCE use it.

The optimisation runs in fp32 whatever the UNet's dtype: its losses (about 1e-5) underflow in
fp16. The result is an :class:`Inversion` that can be cached and reused for every edit of the
same image and source prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.ddim import DDIMSampler
from models.params import NullTextSettings

ProgressCallback = Callable[[str, int, int], None]


@dataclass
class Inversion:
    """x_T plus one optimised unconditional embedding per denoising step (fp32, on CPU)."""

    x_T: torch.Tensor
    uncond_embeddings: torch.Tensor
    key: str
    settings: dict = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def save(self, path: Path) -> None:
        meta = {"key": self.key, "settings": json.dumps(self.settings), "losses": json.dumps(self.losses)}
        save_file(
            {"x_T": self.x_T.contiguous(), "uncond_embeddings": self.uncond_embeddings.contiguous()},
            str(path),
            metadata=meta,
        )

    @classmethod
    def load(cls, path: Path) -> Inversion:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        return cls(
            x_T=tensors["x_T"],
            uncond_embeddings=tensors["uncond_embeddings"],
            key=meta["key"],
            settings=json.loads(meta["settings"]),
            losses=json.loads(meta["losses"]),
        )


def inversion_key(
    image: np.ndarray,
    prompt: str,
    model_identity: str,
    scheduler_config: dict,
    steps: int,
    guidance_scale: float,
    null_text: NullTextSettings,
) -> str:
    """Content hash of everything an inversion depends on (the model-size pixels, not a path)."""
    h = hashlib.sha256()
    pixels = np.ascontiguousarray(image, dtype=np.float32)
    h.update(repr(pixels.shape).encode())
    h.update(pixels.tobytes())
    settings = {
        "prompt": prompt,
        "model": model_identity,
        "scheduler": {k: scheduler_config[k] for k in sorted(scheduler_config)},
        "steps": steps,
        "guidance_scale": guidance_scale,
        "null_text": null_text.model_dump(),
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


class InversionCache:
    """Inversions stored as safetensors files named by their key."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> Inversion | None:
        path = self._path(key)
        return Inversion.load(path) if path.exists() else None

    def put(self, inversion: Inversion) -> None:
        tmp = self._path(inversion.key).with_suffix(".tmp")
        inversion.save(tmp)
        tmp.replace(self._path(inversion.key))


def _eps(unet, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
    dtype = unet.dtype
    return unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()


@torch.no_grad()
def ddim_invert(
    unet,
    sampler: DDIMSampler,
    z0: torch.Tensor,
    cond: torch.Tensor,
    callback: ProgressCallback | None = None,
) -> list[torch.Tensor]:
    """Latents [z_0, ..., z_T] of a DDIM inversion with the conditional prompt only (guidance 1)."""
    latents = [z0.float()]
    x = z0.float()
    for i, t in enumerate(reversed(sampler.timesteps)):
        x = sampler.invert_step(_eps(unet, x, t, cond), t, x)
        latents.append(x)
        if callback:
            callback("inversion", i + 1, sampler.num_steps)
    return latents


def null_text_optimize(
    unet,
    sampler: DDIMSampler,
    latents: list[torch.Tensor],
    cond: torch.Tensor,
    uncond_init: torch.Tensor,
    guidance_scale: float,
    settings: NullTextSettings = NullTextSettings(),
    callback: ProgressCallback | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Per-step unconditional embeddings that make guided DDIM sampling retrace ``latents``.

    Returns the (steps, 77, D) embeddings and the last loss of each outer step.
    """
    uncond = uncond_init.detach().float().clone()
    x = latents[-1]
    embeddings, losses = [], []
    n = sampler.num_steps
    for i, t in enumerate(sampler.timesteps):
        target = latents[n - i - 1]
        with torch.no_grad():
            eps_cond = _eps(unet, x, t, cond)
        uncond = uncond.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([uncond], lr=settings.learning_rate * (1.0 - i / 100.0))
        threshold = settings.early_stop + i * settings.early_stop_growth
        loss_value = float("nan")
        for _ in range(settings.inner_steps):
            eps_uncond = _eps(unet, x, t, uncond)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            loss = torch.nn.functional.mse_loss(sampler.step(eps, t, x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            if loss_value < threshold:
                break
        uncond = uncond.detach()
        embeddings.append(uncond[0].cpu())
        losses.append(loss_value)
        with torch.no_grad():
            eps_uncond = _eps(unet, x, t, uncond)
            x = sampler.step(eps_uncond + guidance_scale * (eps_cond - eps_uncond), t, x)
        if callback:
            callback("null_text", i + 1, n)
    return torch.stack(embeddings), losses
