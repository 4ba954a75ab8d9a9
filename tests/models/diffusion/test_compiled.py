"""The compiled UNet of the inversion loops gives the eager UNet's inversions; where it cannot be
compiled the eager UNet runs and a line says so."""

import logging

import torch

from models.diffusion.compiled import compile_loops
from models.methods.prism import invert
from models.request.params import EditParams, NullTextSettings
from tests.helpers import SOURCE


def test_compiled_inversion_loops_equal_the_eager_ones(bundle):
    """torch.compile's graph capture and autograd, with eager kernels as the code generator:
    TorchInductor's C++ build of this UNet takes minutes on two cores (docs/speed has its run)."""
    compiled = compile_loops(bundle, "compile", backend="aot_eager")
    assert compiled.compile == "compile" and compiled.loop_unet is not bundle.unet
    image = torch.rand(1, 1, bundle.resolution, bundle.resolution, generator=torch.Generator().manual_seed(3))
    for mode in ("null_text", "direct"):
        params = EditParams(steps=4, inversion=mode, null_text=NullTextSettings(inner_steps=3))
        (eager, _), (fast, _) = (invert(b, [image], [SOURCE], params)[0] for b in (bundle, compiled))
        assert (fast.x_T - eager.x_T).abs().max() < 1e-5
        assert (fast.uncond_embeddings - eager.uncond_embeddings).abs().max() < 1e-4
        assert fast.losses == [] or max(abs(a - b) / b for a, b in zip(fast.losses, eager.losses, strict=True)) < 1e-4
        if mode == "direct":
            assert (fast.latent_offsets - eager.latent_offsets).abs().max() < 1e-5


def test_where_compiling_fails_the_eager_unet_runs_and_says_so(bundle, caplog):
    with caplog.at_level(logging.WARNING, logger="prism.models"):
        no_cuda = compile_loops(bundle, "cudagraph")
        broken = compile_loops(bundle, "compile", backend="no-such-backend")
    for fallback in (no_cuda, broken):
        assert fallback.compile == "off" and fallback.inversion_unet is bundle.unet
    assert "cudagraph needs CUDA" in caplog.text and "compiling the UNet failed" in caplog.text
    assert compile_loops(bundle, "off").inversion_unet is bundle.unet
