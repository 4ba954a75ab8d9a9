"""A compiled UNet for the loops that call it hundreds of times at one shape: DDIM inversion,
null-text optimisation (forward and backward) and direct inversion's offsets. No attention control
runs there, so the whole UNet is one graph; editing keeps the eager UNet, whose processors
prompt-to-prompt swaps.

``compile`` is ``torch.compile`` (TorchInductor); ``cudagraph`` adds CUDA graphs (its
"reduce-overhead" mode), which replay a step's kernels without launching them one by one. Both
are warmed once per batch shape at worker start (a batch of one and the worker's largest), so no
job pays the compilation; where compiling fails (no compiler, no CUDA for CUDA graphs) the eager
UNet is used and a line is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch
from diffusers import UNet2DConditionModel

from models.diffusion.components import ModelBundle
from models.request.constants import TOKEN_WINDOW

CompileMode = Literal["off", "compile", "cudagraph"]
log = logging.getLogger("prism.models")


def warm_up(unet: torch.nn.Module, batch_sizes: Sequence[int], latent_side: int, device: torch.device) -> None:
    """Run ``unet`` as the inversion and null-text loops do (a forward without gradients, and one
    with the gradient at the text embedding) at each batch size."""
    config = unet.config
    dtype = next(unet.parameters()).dtype
    timestep = torch.tensor(999, device=device)
    for batch in batch_sizes:
        x = torch.zeros(batch, config.in_channels, latent_side, latent_side, device=device, dtype=dtype)
        text = torch.zeros(batch, TOKEN_WINDOW, config.cross_attention_dim, device=device, dtype=dtype)
        with torch.no_grad():
            unet(x, timestep, encoder_hidden_states=text)
        text.requires_grad_(True)
        out = unet(x, timestep, encoder_hidden_states=text).sample
        torch.autograd.grad(out.float().sum(), text)


def compile_unet(
    unet: UNet2DConditionModel,
    mode: CompileMode,
    batch_sizes: Sequence[int],
    device: torch.device,
    backend: str = "inductor",
) -> tuple[torch.nn.Module, CompileMode]:
    """The UNet the inversion loops call, and the mode it actually runs in. ``backend`` is
    torch.compile's code generator: TorchInductor, or e.g. ``aot_eager`` (the same graph capture
    and autograd, run by eager kernels) where a test cannot wait for Inductor's C++ build."""
    if mode == "off":
        return unet, "off"
    if mode == "cudagraph" and device.type != "cuda":
        log.warning("PRISM_COMPILE=cudagraph needs CUDA; the inversion loops run the eager UNet")
        return unet, "off"
    try:
        compiled = torch.compile(unet, backend=backend, mode="reduce-overhead" if mode == "cudagraph" else None)
        warm_up(compiled, batch_sizes, int(unet.config.sample_size), device)
    except Exception as exc:  # TorchInductor's errors have no common base: any of them means eager
        log.warning("compiling the UNet failed (%s); the inversion loops run the eager UNet", type(exc).__name__)
        return unet, "off"
    return compiled, mode


def compile_loops(bundle: ModelBundle, mode: CompileMode, max_batch: int = 1, backend: str = "inductor") -> ModelBundle:
    """The bundle with its inversion loops' UNet compiled in ``mode``, warmed for batches of one
    and of ``max_batch`` (a batching worker's largest)."""
    unet, used = compile_unet(bundle.unet, mode, sorted({1, max_batch}), bundle.device, backend)
    return replace(bundle, loop_unet=None if used == "off" else unet, compile=used)
