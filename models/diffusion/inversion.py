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
from models.diffusion.ddim import DDIMSampler
from models.diffusion.packing import PackProgress
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


def predict_eps(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction in the UNet's dtype (the graph stays attached for gradients).

    ``t`` is a 0-d tensor on the latent's device (:meth:`DDIMSampler.timestep_tensors`) and the
    latent goes in contiguous: a compiled UNet (``models.diffusion.compiled``) would otherwise be
    specialised on, and recompiled for, every timestep's value and every memory layout (the VAE's
    posterior mean is a strided view). The output may be a buffer the next call overwrites (a
    CUDA graph's static output): a caller that keeps it past that call keeps :func:`eps_fp32`."""
    dtype = unet.dtype
    return unet(x.to(dtype).contiguous(), t, encoder_hidden_states=context.to(dtype)).sample


def eps_fp32(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """:func:`predict_eps` as an fp32 tensor of its own (a copy even where the UNet runs in fp32)."""
    return predict_eps(unet, x, t, context).to(torch.float32, copy=True)


@torch.no_grad()
def ddim_invert(
    unet,
    sampler: DDIMSampler,
    z0: torch.Tensor,
    cond: torch.Tensor,
    progress: PackProgress | None = None,
) -> list[torch.Tensor]:
    """Latents [z_0, ..., z_T] (each (B, C, h, w)) of a DDIM inversion of a batch of latents, each
    with its conditional prompt only (guidance 1); rows of items that leave ``progress`` are dropped."""
    latents = [z0.float()]
    x = z0.float()
    timesteps = sampler.timestep_tensors(x.device)
    for i, (t, t_device) in enumerate(zip(reversed(sampler.timesteps), reversed(timesteps), strict=True)):
        x = sampler.invert_step(eps_fp32(unet, x, t_device, cond), t, x)
        latents.append(x)
        if progress is not None and (rows := progress.report("inversion", i + 1, sampler.num_steps)) is not None:
            latents, cond = [z[rows] for z in latents], cond[rows]
            x = latents[-1]
            if not rows:
                break
    return latents


def input_gradient(
    output: torch.Tensor, grad_output: torch.Tensor, inputs: torch.Tensor, backoff: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient at ``inputs`` of a loss whose gradient at ``output.float()`` is ``grad_output``
    (fp32), where the batch of ``output`` (rows = samples) was computed from ``inputs`` row for
    row; and, per row, whether it is finite.

    For an fp32 ``output`` that is plain autograd. For fp16/bf16, ``grad_output`` is scaled, row by
    row, by a power of two that puts the row's peak near :data:`GRAD_PEAK`, divided by
    ``2**backoff`` (per row, 0 by default), before it enters the UNet's backward pass, and
    unscaled at ``inputs``: a sample's gradient does not depend on how small another's is (the UNet
    mixes no samples). One backward pass, freeing the graph: a row that overflowed is for the
    caller to run again with a larger ``backoff`` (a compiled backward cannot keep its graph).
    """
    if output.dtype == torch.float32:
        (grad,) = torch.autograd.grad(output, inputs, grad_output)
        return grad, torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
    peak = grad_output.flatten(1).abs().amax(1)
    shift = torch.where(peak > 0, torch.floor(torch.log2(GRAD_PEAK / peak)), torch.zeros_like(peak))
    if backoff is not None:
        shift = shift - backoff
    scale = torch.exp2(shift)
    (scaled,) = torch.autograd.grad(output, inputs, (grad_output * _per_row(scale, grad_output)).to(output.dtype))
    return scaled / _per_row(scale, scaled).to(scaled), torch.isfinite(scaled.flatten(1)).all(1)


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) ``values`` shaped to scale the rows of ``like`` (B, ...)."""
    return values.view((-1,) + (1,) * (like.dim() - 1))


@dataclass
class RowAdam:
    """Adam (Kingma and Ba, Algorithm 1; torch.optim.Adam's defaults and arithmetic) over the rows
    of one tensor, each row with its own moments and its own step count, and a step that moves
    only the rows it is told to. ``torch.optim.Adam`` keeps one step count per tensor, so a row
    could not skip a step (frozen by its early stop, or run again after an fp16 overflow) without
    the host choosing which rows to pass it, a read from the device at every step."""

    param: torch.Tensor
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        self.exp_avg = torch.zeros_like(self.param)
        self.exp_avg_sq = torch.zeros_like(self.param)
        self.steps = torch.zeros(self.param.shape[0], dtype=torch.float64, device=self.param.device)

    def step(self, grad: torch.Tensor, rows: torch.Tensor) -> None:
        """One step of the rows where ``rows`` (B,) is True; the others keep parameters and state.
        The bias corrections are float64, as torch.optim.Adam's Python floats."""
        beta1, beta2 = self.betas
        keep = _per_row(rows, self.param)
        steps = self.steps + rows.to(self.steps.dtype)
        exp_avg = torch.where(keep, self.exp_avg.lerp(grad, 1 - beta1), self.exp_avg)
        squared = torch.addcmul(self.exp_avg_sq * beta2, grad, grad, value=1 - beta2)
        exp_avg_sq = torch.where(keep, squared, self.exp_avg_sq)
        counted = steps.clamp_min(1)
        step_size = _per_row((self.lr / (1 - beta1**counted)).to(self.param.dtype), self.param)
        correction = _per_row((1 - beta2**counted).sqrt().to(self.param.dtype), self.param)
        denom = exp_avg_sq.sqrt() / correction + self.eps
        self.param.copy_(torch.where(keep, self.param - step_size * exp_avg / denom, self.param))
        self.exp_avg, self.exp_avg_sq, self.steps = exp_avg, exp_avg_sq, steps


MAX_BACKOFF = 64
"""How far (in powers of two) an overflowing row's gradient scale is lowered before the row gives
up the rest of its outer step, unchanged."""

EARLY_STOP_CHECK_EVERY = 1
"""Null-text reads which images are still running from the device every this many inner steps:
the only read inside its loop. Results do not depend on it (an image that stopped in between is
masked out of the optimiser); a larger value trades UNet rows run for nothing for fewer waits."""


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
    progress: PackProgress | None = None,
    check_every: int = EARLY_STOP_CHECK_EVERY,
) -> tuple[torch.Tensor, list[list[float]]]:
    """Per-step unconditional embeddings that make guided DDIM sampling retrace ``latents``, for a
    batch of B inversions (``cond`` (B, 77, D); ``uncond_init`` (1 or B, 77, D)).

    Each image has its own embedding and its own Adam moments and step count (:class:`RowAdam`),
    and its own early stop: once its loss is below the step's threshold it is frozen for the rest
    of the outer step, not moved by the optimiser, exactly as if it ran alone; from the next read
    of who is running (every ``check_every`` inner steps) it is not run through the UNet either.
    Everything else stays on the device: the early stop, the losses (read once, at the end) and,
    with a reduced-precision UNet, the rows whose scaled gradient overflowed, which take their
    step again at the next inner step with a 256 times smaller scale. Returns the (B, steps, 77, D)
    embeddings (on the CPU) and each image's last loss of each outer step, for the items that did
    not leave ``progress``.
    """
    x = latents[-1]
    device, batch = x.device, x.shape[0]
    uncond = uncond_init.detach().float().expand(batch, -1, -1).clone()
    embeddings: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    n = sampler.num_steps
    reduced = unet.dtype != torch.float32
    for i, (t, t_device) in enumerate(zip(sampler.timesteps, sampler.timestep_tensors(device), strict=True)):
        target = latents[n - i - 1]
        with torch.no_grad():
            eps_cond = eps_fp32(unet, x, t_device, cond)
        optimizer = RowAdam(uncond, null_text_learning_rate(settings.learning_rate, i, n))
        threshold = settings.early_stop + i * settings.early_stop_growth
        running = torch.ones(batch, dtype=torch.bool, device=device)
        backoff = torch.zeros(batch, device=device)
        last = torch.full((batch,), float("nan"), device=device)
        rows = torch.arange(batch, device=device)
        for inner in range(settings.inner_steps + (MAX_BACKOFF // 8 if reduced else 0)):
            active = uncond[rows].requires_grad_(True)
            output = predict_eps(unet, x[rows], t_device, active)
            eps_uncond = output.detach().float().requires_grad_(True)
            eps = eps_uncond + guidance_scale * (eps_cond[rows] - eps_uncond)
            per_image = (sampler.step(eps, t, x[rows]) - target[rows]).pow(2).flatten(1).mean(1)
            (grad_output,) = torch.autograd.grad(per_image.sum(), eps_uncond)
            grad, finite = input_gradient(output, grad_output, active, backoff[rows])
            taking = running.index_select(0, rows)
            step = torch.zeros_like(running).index_copy(0, rows, taking & finite)
            optimizer.step(torch.zeros_like(uncond).index_copy(0, rows, grad), step)
            loss = last.index_copy(0, rows, per_image.detach())
            last = torch.where(running, loss, last)
            overflow = running & ~step
            backoff = backoff + 8 * overflow
            running = running & ~(step & (loss < threshold)) & (optimizer.steps < settings.inner_steps)
            running = running & (backoff <= MAX_BACKOFF)
            if (inner + 1) % check_every == 0 or inner + 1 >= settings.inner_steps:
                rows = running.nonzero()[:, 0]
                if not len(rows):
                    break
        embeddings.append(uncond.clone())
        losses.append(last)
        with torch.no_grad():
            eps_uncond = eps_fp32(unet, x, t_device, uncond)
            x = sampler.step(eps_uncond + guidance_scale * (eps_cond - eps_uncond), t, x)
        if progress is not None and (stay := progress.report("null_text", i + 1, n)) is not None:
            x, cond, uncond = x[stay], cond[stay], uncond[stay]
            latents = [z[stay] for z in latents]
            embeddings, losses = [e[stay] for e in embeddings], [v[stay] for v in losses]
            batch = len(stay)
            if not stay:
                break
    if not embeddings or batch == 0:
        return torch.empty(0), [[] for _ in range(batch)]
    return torch.stack(embeddings, dim=1).cpu(), torch.stack(losses, dim=1).tolist()


@torch.no_grad()
def direct_offsets(
    unet,
    sampler: DDIMSampler,
    latents: list[torch.Tensor],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    progress: PackProgress | None = None,
) -> torch.Tensor:
    """(steps, B, C, h, w): z*_{t-1} minus one guided DDIM step from z*_t, for each step and each
    of a batch of inversions (``cond`` (B, 77, D), ``uncond`` (1 or B, 77, D))."""
    n = sampler.num_steps
    offsets: list[torch.Tensor] = []
    timesteps = sampler.timestep_tensors(latents[0].device)
    for i, (t, t_device) in enumerate(zip(sampler.timesteps, timesteps, strict=True)):
        x = latents[n - i]
        context = torch.cat([uncond.expand(x.shape[0], -1, -1), cond])
        eps_uncond, eps_cond = eps_fp32(unet, torch.cat([x, x]), t_device, context).chunk(2)
        offsets.append(latents[n - i - 1] - sampler.step(eps_uncond + guidance_scale * (eps_cond - eps_uncond), t, x))
        if progress is not None and (rows := progress.report("offsets", i + 1, n)) is not None:
            latents, cond, offsets = [z[rows] for z in latents], cond[rows], [o[rows] for o in offsets]
            if not rows:
                break
    return torch.stack(offsets).cpu()
