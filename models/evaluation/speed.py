"""``prism bench-speed``: where the time of one counterfactual goes, per inversion mode.

For each mode a cold run (no cached inversion) and a cached run (a second edit of the same image
and source prompt) are timed per phase; the median of ``repeats`` runs is kept, after one
untimed warm-up. Peak memory and the device are recorded with the figures.
"""

from __future__ import annotations

import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from pydantic import BaseModel

from models.diffusion.components import ModelBundle
from models.diffusion.inversion import InversionCache
from models.imaging.files import DecodedImage
from models.pipeline import generate_counterfactual
from models.request.params import EditParams, InversionMode
from models.request.resolve import ResolvedEdit

PHASES = ("encode", "inversion", "null_text", "offsets", "editing", "decode", "scoring")


class SpeedRow(BaseModel):
    mode: InversionMode
    cached: bool
    seconds: float
    phases: dict[str, float]


class BenchSetup(BaseModel):
    """What a timing was taken on: the device, the UNet's precision, the model and the schedule."""

    device: str
    dtype: str
    model: str
    resolution: int
    steps: int
    sweep: list[float]

    @staticmethod
    def of(bundle: ModelBundle, params: EditParams) -> dict:
        """The setup's fields for ``bundle`` running ``params``, for a report built on this one."""
        return {
            "device": device_name(bundle.device),
            "dtype": str(bundle.dtype).removeprefix("torch."),
            "model": bundle.identity,
            "resolution": bundle.resolution,
            "steps": params.steps,
            "sweep": list(params.self_replace_steps),
        }


class SpeedReport(BenchSetup):
    inner_steps: int
    repeats: int
    peak_memory_mib: float
    rows: list[SpeedRow]

    def markdown(self) -> str:
        head = "| mode | inversion | s per counterfactual | " + " | ".join(PHASES) + " |\n"
        head += "| --- | --- | --- |" + " --- |" * len(PHASES) + "\n"
        rows = "".join(
            f"| {r.mode} | {'cached' if r.cached else 'cold'} | {r.seconds:.2f} | "
            + " | ".join(f"{r.phases[p]:.2f}" if p in r.phases else "–" for p in PHASES)
            + " |\n"
            for r in self.rows
        )
        return (
            f"Device: {self.device}; UNet {self.dtype}; model {self.model} at {self.resolution}²; "
            f"{self.steps} steps, sweep {self.sweep}, {self.inner_steps} null-text inner steps; "
            f"median of {self.repeats} after a warm-up; peak memory {self.peak_memory_mib:.0f} MiB.\n\n" + head + rows
        )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    cpu = next(names, platform.processor() or platform.machine())
    return f"{cpu}, {torch.get_num_threads()} threads"


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_speed(
    bundle: ModelBundle,
    image: DecodedImage,
    prompts: tuple[str, str, str],
    params: EditParams,
    repeats: int = 3,
    modes: tuple[InversionMode, ...] = get_args(InversionMode),
    progress: Callable[[str], None] | None = None,
) -> SpeedReport:
    """Time ``modes`` on ``image``; ``prompts`` are the source, an edit, and a second edit (cached run)."""
    source, edit, second_edit = prompts
    if bundle.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bundle.device)
    rows = []
    for mode in modes:
        mode_params = params.replace(inversion=mode)
        runs: dict[bool, list[tuple[float, dict[str, float]]]] = {False: [], True: []}
        for repeat in range(repeats + 1):
            with tempfile.TemporaryDirectory() as directory:
                cache = InversionCache(Path(directory))
                for cached, prompt in ((False, edit), (True, second_edit)):
                    if progress:
                        progress(f"{mode} {'cached' if cached else 'cold'} {repeat}/{repeats}")
                    start = time.perf_counter()
                    result = generate_counterfactual(
                        bundle,
                        image,
                        ResolvedEdit(original_prompt=source, edit_prompt=prompt, params=mode_params),
                        cache=cache,
                    )
                    if bundle.device.type == "cuda":
                        torch.cuda.synchronize(bundle.device)
                    if repeat:
                        runs[cached].append((time.perf_counter() - start, result.report.timings))
        for cached, measured in runs.items():
            seconds = statistics.median(s for s, _ in measured)
            phases = {p: statistics.median(t.get(p, 0.0) for _, t in measured) for p in measured[0][1]}
            rows.append(SpeedRow(mode=mode, cached=cached, seconds=round(seconds, 3), phases=phases))
    return SpeedReport(
        **BenchSetup.of(bundle, params),
        inner_steps=params.null_text.inner_steps,
        repeats=repeats,
        peak_memory_mib=round(_peak_memory_mib(bundle.device), 1),
        rows=rows,
    )


def smooth_image(size: int, seed: int = 0) -> DecodedImage:
    """A 16-bit grayscale test image with structure at several scales (timing does not depend on it)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    pixels = 0.5 + 0.2 * np.sin(8 * xx + rng.uniform(0, 3)) * np.cos(5 * yy) + 0.05 * rng.standard_normal((size, size))
    return DecodedImage(np.clip(pixels, 0, 1).astype(np.float32), 16)


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::_local_scalar_dense")
"""Profiler events that mark the host waiting for the device (or a copy between them)."""


def profile_null_text(bundle: ModelBundle, image: DecodedImage, prompt: str, inner_steps: int, out: Path) -> str:
    """A torch.profiler trace (``out/trace.json``) and summary (returned) of one null-text outer
    step of ``inner_steps`` inner steps on ``image`` (no early stop), after one untimed: where an
    inner step's time goes (the UNet's forward and backward, the fp16 gradient's scaling, Adam, the
    host's waits)."""
    from models.diffusion.components import embed_prompts, encode_latent
    from models.diffusion.ddim import DDIMSampler
    from models.diffusion.inversion import ddim_invert, null_text_optimize
    from models.imaging.geometry import to_model_input
    from models.request.params import NullTextSettings

    sampler = DDIMSampler(bundle.scheduler, 1)
    settings = NullTextSettings(inner_steps=inner_steps, early_stop=0.0, early_stop_growth=0.0)
    cond, uncond = embed_prompts(bundle.text_encoder, bundle.tokenizer, [prompt, ""]).chunk(2)
    latents = ddim_invert(
        bundle.inversion_unet,
        sampler,
        encode_latent(bundle.vae, to_model_input(image.pixels, bundle.resolution)[0]),
        cond,
    )

    def step() -> None:
        null_text_optimize(bundle.inversion_unet, sampler, latents, cond, uncond, 7.5, settings)
        if bundle.device.type == "cuda":
            torch.cuda.synchronize(bundle.device)

    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if bundle.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profiler:
        step()
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(out / "trace.json"))
    events = profiler.key_averages()
    counts = {e.key: e.count for e in events if e.key in SYNC_EVENTS or e.key == "cudaLaunchKernel"}
    sort = "self_cuda_time_total" if bundle.device.type == "cuda" else "self_cpu_time_total"
    return (
        f"Device: {device_name(bundle.device)}; UNet {str(bundle.dtype).removeprefix('torch.')}, loops "
        f"{bundle.compile}; one null-text outer step of {inner_steps} inner steps (plus its conditional and "
        f"advancing passes): {seconds:.3f} s under the profiler.\n\n"
        "Host waits and launches: "
        + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none recorded")
        + "\n\n```\n"
        + events.table(sort_by=sort, row_limit=30)
        + "\n```\n"
    )


class PrecisionRow(BaseModel):
    dtype: str
    seconds: float
    s_clip: float
    chosen_self_replace: float | None
    max_counterfactual_diff: float
    s_clip_diff: float
    same_candidate: bool


class PrecisionReport(BaseModel):
    device: str
    model: str
    steps: int
    rows: list[PrecisionRow]

    def markdown(self) -> str:
        head = "| UNet | s | S_CLIP | chosen self_replace | max Δcounterfactual | ΔS_CLIP | same candidate |\n"
        head += "| --- " * 7 + "|\n"
        rows = "".join(
            f"| {r.dtype} | {r.seconds:.2f} | {r.s_clip:.4f} | {r.chosen_self_replace} | "
            f"{r.max_counterfactual_diff:.1e} | {r.s_clip_diff:.1e} | {'yes' if r.same_candidate else 'no'} |\n"
            for r in self.rows
        )
        return (
            f"Device: {self.device}; model {self.model}; {self.steps} steps; one job per precision on the same "
            "input, Δ against the first row (counterfactual intensities in [0, 1]).\n\n" + head + rows
        )


def compare_precisions(
    bundles: Callable[[str], ModelBundle],
    dtypes: tuple[str, ...],
    image: DecodedImage,
    prompts: tuple[str, str],
    params: EditParams,
    progress: Callable[[str], None] | None = None,
) -> PrecisionReport:
    """One job in each of ``dtypes`` (``bundles(dtype)`` loads the model with its UNet in it), each
    against the first: how far the UNet's precision moves the counterfactual and its S_CLIP."""
    source, edit = prompts
    rows, first = [], None
    for dtype in dtypes:
        bundle = bundles(dtype)
        if progress:
            progress(dtype)
        start = time.perf_counter()
        result = generate_counterfactual(
            bundle, image, ResolvedEdit(original_prompt=source, edit_prompt=edit, params=params)
        )
        seconds = time.perf_counter() - start
        first = first or result
        rows.append(
            PrecisionRow(
                dtype=dtype,
                seconds=round(seconds, 3),
                s_clip=result.report.s_clip,
                chosen_self_replace=result.report.chosen_self_replace,
                max_counterfactual_diff=float(np.abs(result.counterfactual - first.counterfactual).max()),
                s_clip_diff=abs(result.report.s_clip - first.report.s_clip),
                same_candidate=result.report.chosen_self_replace == first.report.chosen_self_replace,
            )
        )
        device, model = device_name(bundle.device), bundle.identity
        del bundle
    return PrecisionReport(device=device, model=model, steps=params.steps, rows=rows)
