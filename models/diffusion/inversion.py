"""Inverting an image to x_T plus what guided DDIM sampling needs to retrace it.

Three ways (``InversionMode``), all after a DDIM inversion under the source prompt (guidance 1):

* ``null_text`` (Mokady et al., PRISM's): one optimised unconditional embedding per step, so that
  guided sampling retraces the inversion latents. The loss and the optimiser run in fp32 whatever
  the UNet's dtype; with a reduced-precision UNet the gradient entering it is scaled into the
  dtype's range (:func:`input_gradient`), since the losses (about 1e-5 or less) underflow fp16.
* ``negative_prompt`` (Miyake et al.): the source prompt's embedding as the unconditional one at
  every step; no optimisation.
* ``direct`` (Ju et al., "PnP inversion"): the empty prompt as the unconditional embedding, and for
  each step the offset between the inversion latent and one guided step from the previous one;
  adding it to the source branch keeps that branch on the inversion trajectory (the edit branch is
  left free). No optimisation.

The result is an :class:`Inversion`, cached and reused for every edit of the same image and prompt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from models.atomic import write_aside
from models.diffusion.batching import BatchProgress
from models.diffusion.ddim import DDIMSampler
from models.request.params import InversionMode, NullTextSettings

log = logging.getLogger("prism.inversion")

GRAD_PEAK = 2.0**8
"""Largest magnitude the gradient entering a reduced-precision UNet is scaled to: far above fp16's
underflow (6e-8), with room below its overflow (65504) for growth through the backward pass."""


@dataclass
class Inversion:
    """x_T, one unconditional embedding per denoising step and, for ``direct``, one latent offset
    per step (fp32, on CPU)."""

    x_T: torch.Tensor
    uncond_embeddings: torch.Tensor
    key: str
    mode: InversionMode = "null_text"
    latent_offsets: torch.Tensor | None = None
    settings: dict = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def save(self, path: Path) -> None:
        tensors = {"x_T": self.x_T.contiguous(), "uncond_embeddings": self.uncond_embeddings.contiguous()}
        if self.latent_offsets is not None:
            tensors["latent_offsets"] = self.latent_offsets.contiguous()
        meta = {
            "key": self.key,
            "mode": self.mode,
            "settings": json.dumps(self.settings),
            "losses": json.dumps(self.losses),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> Inversion:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        return cls(
            x_T=tensors["x_T"],
            uncond_embeddings=tensors["uncond_embeddings"],
            key=meta["key"],
            mode=meta["mode"],
            latent_offsets=tensors.get("latent_offsets"),
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
    mode: InversionMode = "null_text",
) -> str:
    """Content hash of everything an inversion depends on (the model-size pixels, not a path)."""
    h = hashlib.sha256()
    pixels = np.ascontiguousarray(image, dtype=np.float32)
    h.update(repr(pixels.shape).encode())
    h.update(pixels.tobytes())
    settings = {
        "prompt": prompt,
        "model": model_identity,
        # diffusers' private entries (e.g. ``_use_default_values``, a set's order) differ between processes
        "scheduler": {k: scheduler_config[k] for k in sorted(scheduler_config) if not k.startswith("_")},
        "steps": steps,
        "guidance_scale": guidance_scale,
        "mode": mode,
        "null_text": null_text.model_dump() if mode == "null_text" else None,
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


class InversionCache:
    """Inversions stored as safetensors files named by their key, in a directory that any number of
    workers on one host may share.

    Writes are atomic (:func:`models.atomic.write_aside`, private to each process). A write or a
    hit stamps the file's modification time; after each write the least recently used files are
    deleted until the directory holds at most ``max_bytes`` (None: unbounded). A file deleted or
    damaged under a reader is a miss.

    The stamps are ``time.time_ns()``, not the file system's own: the kernel times a write and a
    plain ``utime`` by its coarse clock (one tick is milliseconds), so a hit just after another
    file's write could tie with it and lose its place.
    """

    def __init__(self, directory: Path, max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> Inversion | None:
        path = self._path(key)
        try:
            inversion = Inversion.load(path)
            _stamp(path)
        except (FileNotFoundError, SafetensorError, KeyError, ValueError):
            return None
        return inversion

    def put(self, inversion: Inversion) -> None:
        path = self._path(inversion.key)
        write_aside(path, inversion.save, tag=f".{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):  # another worker has evicted it already
            _stamp(path)
        self.evict()

    def evict(self) -> None:
        """Delete least recently used inversions until the directory fits ``max_bytes``."""
        if self.max_bytes is None:
            return
        entries = []
        for path in self.directory.glob("[!.]*.safetensors"):  # not another writer's partial file
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def _stamp(path: Path) -> None:
    """Mark ``path`` as used now, at the clock's full resolution."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _eps(unet, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction in the UNet's dtype (the graph stays attached for gradients).

    The timestep goes in as a tensor and the latent contiguous: a compiled UNet
    (``models.diffusion.compiled``) would otherwise be specialised on, and recompiled for, every
    timestep's value and every memory layout (the VAE's posterior mean is a strided view)."""
    dtype = unet.dtype
    timestep = torch.tensor(t, device=x.device)
    latent = x.to(dtype).contiguous()
    return unet(latent, timestep, encoder_hidden_states=context.to(dtype)).sample


@torch.no_grad()
def ddim_invert(
    unet,
    sampler: DDIMSampler,
    z0: torch.Tensor,
    cond: torch.Tensor,
    progress: BatchProgress | None = None,
) -> list[torch.Tensor]:
    """Latents [z_0, ..., z_T] (each (B, C, h, w)) of a DDIM inversion of a batch of latents, each
    with its conditional prompt only (guidance 1); rows of items that leave ``progress`` are dropped."""
    latents = [z0.float()]
    x = z0.float()
    for i, t in enumerate(reversed(sampler.timesteps)):
        x = sampler.invert_step(_eps(unet, x, t, cond).float(), t, x)
        latents.append(x)
        if progress is not None and (rows := progress.report("inversion", i + 1, sampler.num_steps)) is not None:
            latents, cond = [z[rows] for z in latents], cond[rows]
            x = latents[-1]
            if not rows:
                break
    return latents


def input_gradient(
    loss: torch.Tensor, output: torch.Tensor, upcast: torch.Tensor, inputs: torch.Tensor
) -> torch.Tensor:
    """The gradient of a ``loss`` computed in fp32 from ``upcast = output.float()`` at ``inputs``,
    which the batch of ``output`` (rows = samples) was computed from, row for row.

    For an fp32 ``output`` that is plain autograd. For fp16/bf16, the gradient at ``upcast``
    (computed in fp32, through the loss only) is scaled, row by row, by a power of two that puts
    the row's peak near :data:`GRAD_PEAK` before it enters the UNet's backward pass, and unscaled
    at ``inputs``: a sample's gradient does not depend on how small another's is (the UNet mixes no
    samples). A row whose scaled backward overflows is repeated with a scale 256 times smaller.
    """
    if output.dtype == torch.float32:
        (grad,) = torch.autograd.grad(loss, inputs)
        return grad
    (grad,) = torch.autograd.grad(loss, upcast, retain_graph=True)
    peak = grad.flatten(1).abs().amax(1)
    shift = torch.where(peak > 0, torch.floor(torch.log2(GRAD_PEAK / peak)), torch.zeros_like(peak))
    while True:
        scale = torch.exp2(shift)
        scaled_output = (grad * _per_row(scale, grad)).to(output.dtype)
        (scaled,) = torch.autograd.grad(output, inputs, scaled_output, retain_graph=True)
        overflow = ~torch.isfinite(scaled.flatten(1)).all(1) & (shift >= -64)
        if not overflow.any():
            return scaled / _per_row(scale, scaled).to(scaled)
        shift = shift - 8 * overflow


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) ``values`` shaped to scale the rows of ``like`` (B, ...)."""
    return values.view((-1,) + (1,) * (like.dim() - 1))


def null_text_learning_rate(base: float, step: int, steps: int) -> float:
    """Adam's rate at outer step ``step``: the reference's ``base * (1 - step / 100)`` at its 50
    steps, that is a linear fall to half, stretched over ``steps`` (the literal schedule reaches 0
    at step 100, which Adam refuses, and would fail any job of 101 steps or more)."""
    return base * (1.0 - step / (2.0 * steps))


def null_text_optimize(
    unet,
    sampler: DDIMSampler,
    latents: list[torch.Tensor],
    cond: torch.Tensor,
    uncond_init: torch.Tensor,
    guidance_scale: float,
    settings: NullTextSettings = NullTextSettings(),
    progress: BatchProgress | None = None,
) -> tuple[torch.Tensor, list[list[float]]]:
    """Per-step unconditional embeddings that make guided DDIM sampling retrace ``latents``, for a
    batch of B inversions (``cond`` (B, 77, D); ``uncond_init`` (1 or B, 77, D)).

    Each image has its own embedding and its own Adam moments (Adam is elementwise), and its own
    early stop: once its loss is below the step's threshold it is frozen for the rest of the outer
    step, neither run through the UNet nor moved by the optimiser's momentum, exactly as if it ran
    alone. Returns the (B, steps, 77, D) embeddings and each image's last loss of each outer step,
    for the items that did not leave ``progress``.
    """
    x = latents[-1]
    batch = x.shape[0]
    uncond = uncond_init.detach().float().expand(batch, -1, -1).clone()
    embeddings: list[torch.Tensor] = []
    losses: list[list[float]] = [[] for _ in range(batch)]
    n = sampler.num_steps
    for i, t in enumerate(sampler.timesteps):
        target = latents[n - i - 1]
        with torch.no_grad():
            eps_cond = _eps(unet, x, t, cond).float()
        uncond = uncond.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([uncond], lr=null_text_learning_rate(settings.learning_rate, i, n))
        threshold = settings.early_stop + i * settings.early_stop_growth
        running = torch.ones(uncond.shape[0], dtype=torch.bool)
        last = [float("nan")] * uncond.shape[0]
        for _ in range(settings.inner_steps):
            rows = running.nonzero()[:, 0]
            active = uncond[rows]
            output = _eps(unet, x[rows], t, active)
            eps_uncond = output.float()
            eps = eps_uncond + guidance_scale * (eps_cond[rows] - eps_uncond)
            per_image = (sampler.step(eps, t, x[rows]) - target[rows]).pow(2).flatten(1).mean(1)
            uncond.grad = torch.zeros_like(uncond).index_copy(
                0, rows, input_gradient(per_image.sum(), output, eps_uncond, active)
            )
            frozen = uncond.detach().clone()
            optimizer.step()
            with torch.no_grad():
                uncond.copy_(torch.where(running[:, None, None], uncond, frozen))
            for row, value in zip(rows.tolist(), per_image.tolist(), strict=True):
                last[row] = value
                running[row] = value >= threshold
            if not running.any():
                break
        uncond = uncond.detach()
        embeddings.append(uncond.cpu())
        for history, value in zip(losses, last, strict=True):
            history.append(value)
        with torch.no_grad():
            eps_uncond = _eps(unet, x, t, uncond).float()
            x = sampler.step(eps_uncond + guidance_scale * (eps_cond - eps_uncond), t, x)
        if progress is not None and (rows := progress.report("null_text", i + 1, n)) is not None:
            x, cond, uncond = x[rows], cond[rows], uncond[rows]
            latents = [z[rows] for z in latents]
            embeddings = [e[rows] for e in embeddings]
            losses = [losses[r] for r in rows]
            if not rows:
                break
    return torch.stack(embeddings, dim=1) if embeddings else torch.empty(0), losses


@torch.no_grad()
def direct_offsets(
    unet,
    sampler: DDIMSampler,
    latents: list[torch.Tensor],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    progress: BatchProgress | None = None,
) -> torch.Tensor:
    """(steps, B, C, h, w): z*_{t-1} minus one guided DDIM step from z*_t, for each step and each
    of a batch of inversions (``cond`` (B, 77, D), ``uncond`` (1 or B, 77, D))."""
    n = sampler.num_steps
    offsets: list[torch.Tensor] = []
    for i, t in enumerate(sampler.timesteps):
        x = latents[n - i]
        context = torch.cat([uncond.expand(x.shape[0], -1, -1), cond])
        eps_uncond, eps_cond = _eps(unet, torch.cat([x, x]), t, context).float().chunk(2)
        offsets.append(latents[n - i - 1] - sampler.step(eps_uncond + guidance_scale * (eps_cond - eps_uncond), t, x))
        if progress is not None and (rows := progress.report("offsets", i + 1, n)) is not None:
            latents, cond, offsets = [z[rows] for z in latents], cond[rows], [o[rows] for o in offsets]
            if not rows:
                break
    return torch.stack(offsets).cpu()
