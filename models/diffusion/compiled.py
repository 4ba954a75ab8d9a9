"""A compiled UNet for the loops that call it hundreds of times at one shape: DDIM inversion,
null-text optimisation (forward and backward) and direct inversion's offsets. No attention control
runs there, so the whole UNet is one graph; editing keeps the eager UNet, whose processors
prompt-to-prompt swaps.

``compile`` is ``torch.compile`` (TorchInductor); ``cudagraph`` adds CUDA graphs (its
"reduce-overhead" mode), which replay a step's kernels without launching them one by one. The
compiled UNet only ever sees the batch sizes of :func:`warm_sizes` (:class:`PaddedUNet`), and the
worker warms each at start by running the loops themselves (:func:`warm_up`, the fp16 gradient
scaling included), so no job compiles or records a graph. Where that fails (no compiler, no CUDA for
CUDA graphs, a backward the backend refuses) the eager UNet is used and a line is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from models.diffusion.components import ModelBundle
from models.diffusion.ddim import DDIMSampler
from models.diffusion.inversion import ddim_invert, direct_offsets, null_text_optimize
from models.request.constants import TOKEN_WINDOW
from models.request.params import NullTextSettings

CompileMode = Literal["off", "compile", "cudagraph"]
Backend = str | Callable
log = logging.getLogger("prism.models")


def warm_sizes(max_pack: int) -> tuple[int, ...]:
    """The batch sizes the loops' UNet runs at, for a worker of batches up to ``max_pack``: powers
    of two up to twice it (direct's offsets run two rows per image), it, and twice it."""
    sizes = {max_pack, 2 * max_pack}
    size = 1
    while size < 2 * max_pack:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


class PaddedUNet(torch.nn.Module):
    """``unet`` called only at the batch ``sizes`` it was warmed for: a batch is padded with zero
    rows up to the next of them (one larger than all runs in pieces of the largest), and the output
    cut back. Each row's result is its own (the UNet mixes no samples), so padding changes nothing
    but which graph runs: a new batch size would otherwise compile, or record a CUDA graph, at job
    time."""

    def __init__(self, unet: torch.nn.Module, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.unet = unet
        self.sizes = sizes

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def config(self):
        return self.unet.config

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> UNet2DConditionOutput:
        rows, largest = sample.shape[0], self.sizes[-1]
        if rows > largest:
            pieces = [
                self(sample[i : i + largest], timestep, encoder_hidden_states[i : i + largest]).sample
                for i in range(0, rows, largest)
            ]
            return UNet2DConditionOutput(sample=torch.cat(pieces))
        size = next(s for s in self.sizes if s >= rows)
        if size > rows:
            sample = torch.cat([sample, sample.new_zeros(size - rows, *sample.shape[1:])])
            encoder_hidden_states = torch.cat(
                [encoder_hidden_states, encoder_hidden_states.new_zeros(size - rows, *encoder_hidden_states.shape[1:])]
            )
        out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        return UNet2DConditionOutput(sample=out[:rows] if size > rows else out)


def warm_up(unet: torch.nn.Module, bundle: ModelBundle, max_pack: int) -> None:
    """Run the inversion loops (DDIM inversion, null-text with its gradient and, in fp16/bf16, its
    scaling, direct's offsets) with ``unet`` for one step at every batch size up to ``max_pack``
    that :func:`warm_sizes` lists: every graph a job will need is made here."""
    config, device = unet.config, bundle.device
    sampler = DDIMSampler(bundle.scheduler, 1)
    settings = NullTextSettings(inner_steps=2, early_stop=0.0, early_stop_growth=0.0)
    for batch in (size for size in warm_sizes(max_pack) if size <= max_pack):
        z0 = torch.zeros(batch, config.in_channels, config.sample_size, config.sample_size, device=device)
        cond = torch.zeros(batch, TOKEN_WINDOW, config.cross_attention_dim, device=device)
        uncond = cond[:1]
        latents = ddim_invert(unet, sampler, z0, cond)
        null_text_optimize(unet, sampler, latents, cond, uncond, 7.5, settings)
        direct_offsets(unet, sampler, latents, cond, uncond, 7.5)


def compile_loops(
    bundle: ModelBundle, mode: CompileMode, max_pack: int = 1, backend: Backend = "inductor"
) -> ModelBundle:
    """The bundle with its inversion loops' UNet compiled in ``mode`` and warmed for batches up to
    ``max_pack`` (a packing worker's largest). ``backend`` is torch.compile's code generator:
    TorchInductor, or e.g. ``aot_eager`` (the same graph capture and autograd, run by eager
    kernels) where a test cannot wait for Inductor's C++ build."""
    if mode == "off":
        return replace(bundle, loop_unet=None, compile="off")
    if mode == "cudagraph" and bundle.device.type != "cuda":
        log.warning("PRISM_COMPILE=cudagraph needs CUDA; the inversion loops run the eager UNet")
        return replace(bundle, loop_unet=None, compile="off")
    try:
        compiled = torch.compile(bundle.unet, backend=backend, mode="reduce-overhead" if mode == "cudagraph" else None)
        unet = PaddedUNet(compiled, warm_sizes(max_pack))
        warm_up(unet, bundle, max_pack)
    except Exception as exc:  # TorchInductor's errors have no common base: any of them means eager
        log.warning("compiling the UNet failed (%s); the inversion loops run the eager UNet", type(exc).__name__)
        return replace(bundle, loop_unet=None, compile="off")
    return replace(bundle, loop_unet=unet, compile=mode)
