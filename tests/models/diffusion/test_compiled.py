"""The compiled UNet of the inversion loops gives the eager UNet's inversions; where it cannot be
compiled the eager UNet runs and a line says so."""

import copy
import logging
from dataclasses import replace

import torch
from torch._dynamo.backends.debugging import aot_eager

from models.diffusion.compiled import PaddedUNet, compile_loops, warm_sizes, warm_up
from models.diffusion.packing import LeavePack, PackProgress
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


def _leaving(batch: int) -> PackProgress:
    """Progress of ``batch`` items, the last of which (when there are several) leaves at null-text's
    or direct's second step."""

    def leave(phase, step, total):
        if step == 2 and phase in ("null_text", "offsets"):
            raise LeavePack

    return PackProgress([None] * (batch - 1) + [leave if batch > 1 else None])


def _images(bundle, count: int) -> list[torch.Tensor]:
    size = bundle.resolution
    return [torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(k)) for k in range(count)]


def test_compiled_loops_run_null_text_in_bf16_and_no_job_compiles(bundle):
    """In bf16 null-text's gradient goes through the UNet scaled, in one backward pass without
    retain_graph, which a compiled backward refuses; the warm-up ran that pass, so jobs compile
    nothing more."""
    bf16 = copy.deepcopy(bundle)
    bf16.unet.to(torch.bfloat16)
    bf16 = replace(bf16, dtype=torch.bfloat16)
    graphs = []

    def counting(graph, inputs):
        graphs.append(graph)
        return aot_eager(graph, inputs)

    torch._dynamo.reset()
    fast = compile_loops(bf16, "compile", backend=counting)
    assert fast.compile == "compile"
    warmed = len(graphs)
    for mode in ("null_text", "direct"):
        params = EditParams(steps=4, inversion=mode, null_text=NullTextSettings(inner_steps=3))
        (eager, _), (compiled, _) = (invert(b, _images(bundle, 1), [SOURCE], params)[0] for b in (bf16, fast))
        assert torch.equal(compiled.x_T, eager.x_T) and torch.equal(compiled.uncond_embeddings, eager.uncond_embeddings)
        assert compiled.losses == eager.losses
    assert len(graphs) == warmed


def test_the_loops_unet_runs_only_the_batch_sizes_the_warm_up_ran(bundle):
    """A batch of 3, and of 2 once an item left, runs padded to 4 (direct's two rows per image: 6
    to 8, 4); each image's result is the one it gets unpadded."""
    padded = replace(bundle, loop_unet=PaddedUNet(bundle.unet, warm_sizes(4)))
    sizes: list[int] = []
    hook = bundle.unet.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    try:
        warm_up(padded.loop_unet, bundle, 4)
        assert set(sizes) == set(warm_sizes(4)) == {1, 2, 4, 8}
        for mode in ("null_text", "direct"):
            params = EditParams(steps=3, inversion=mode, null_text=NullTextSettings(inner_steps=2))
            sizes.clear()
            fast = invert(padded, _images(bundle, 3), [SOURCE] * 3, params, progress=_leaving(3))
            assert set(sizes) <= set(warm_sizes(4)) and 4 in sizes and (8 in sizes) == (mode == "direct")
            plain = invert(bundle, _images(bundle, 3), [SOURCE] * 3, params, progress=_leaving(3))
            assert 3 in sizes  # the unpadded run, for comparison
            for (a, _), (b, _) in zip(fast.values(), plain.values(), strict=True):
                assert (a.x_T - b.x_T).abs().max() < 1e-5
                assert (a.uncond_embeddings - b.uncond_embeddings).abs().max() < 1e-4
                if mode == "direct":
                    assert (a.latent_offsets - b.latent_offsets).abs().max() < 1e-5
    finally:
        hook.remove()


class _StaticOutput(torch.nn.Module):
    """The UNet with the output of every call without gradients in one buffer per shape that the
    next such call overwrites, as a CUDA graph's static output."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet, self.buffers = unet, {}

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, sample, timestep, encoder_hidden_states):
        out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)
        if not torch.is_grad_enabled():
            out.sample = self.buffers.setdefault(out.sample.shape, torch.empty_like(out.sample)).copy_(out.sample)
        return out


def test_the_loops_keep_no_unet_output_past_the_next_call(bundle):
    """With CUDA graphs the next replay overwrites an output: what a loop keeps is its own copy."""
    static = replace(bundle, loop_unet=_StaticOutput(bundle.unet))
    for mode in ("null_text", "direct"):
        params = EditParams(steps=3, inversion=mode, null_text=NullTextSettings(inner_steps=2))
        (plain, _), (replayed, _) = (invert(b, _images(bundle, 1), [SOURCE], params)[0] for b in (bundle, static))
        assert torch.equal(replayed.x_T, plain.x_T) and torch.equal(replayed.uncond_embeddings, plain.uncond_embeddings)
        if mode == "direct":
            assert torch.equal(replayed.latent_offsets, plain.latent_offsets)
