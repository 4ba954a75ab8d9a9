"""The whole PRISM counterfactual: run the request's method, score its candidates with S_CLIP,
keep the best, map it back to the input, and report; for one input, or for a pack of inputs
whose edits can share their passes (a worker's pack of jobs).

Plain arrays and a resolved request in (:func:`models.request.resolve.resolve`); plain arrays and a
typed :class:`~models.request.report.EditReport` out; no HTTP, no queue.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.diffusion.components import ModelBundle, decode_latents
from models.diffusion.inversion import InversionCache
from models.diffusion.packing import LeavePack, PackProgress, ProgressCallback
from models.imaging.dicom import DicomSource, Findings, dicom_outputs
from models.imaging.difference import difference, encode_rgb_png, render_difference
from models.imaging.files import DecodedImage, encode_png
from models.imaging.geometry import from_model_output, quantize, to_model_input
from models.methods.base import Edit, Method, PackMethod, PhaseTimer, RunContext, Source
from models.methods.guided import Guided
from models.methods.prism import Prism
from models.methods.sdedit import SDEdit
from models.request.errors import ImageError, InvalidInput
from models.request.params import DICOM_FILES, EditParams
from models.request.report import (
    CandidateScores,
    DifferenceInfo,
    EditReport,
    EditScores,
    Geometry,
    ModelInfo,
)
from models.request.resolve import ResolvedEdit
from models.scoring.classifier import FindingClassifier
from models.scoring.clip import ClipScorer, score_candidates

SCORE_REFERENCE = "reconstruction"
METHODS: dict[str, Method | PackMethod] = {method.name: method for method in (Prism(), SDEdit(), Guided())}


@dataclass
class Outputs:
    """The chosen candidate at the input's size, intensities in [0, 1], quantized to the input's
    bit depth, and the signed difference from the input."""

    counterfactual: np.ndarray
    reconstruction: np.ndarray
    difference: np.ndarray
    difference_rgb: np.ndarray
    difference_png_scale: float
    edited_fraction: float


@dataclass
class Counterfactual:
    """Outputs at the input's size, intensities in [0, 1], already quantized to ``bit_depth``."""

    original: np.ndarray
    counterfactual: np.ndarray
    reconstruction: np.ndarray
    difference: np.ndarray
    difference_rgb: np.ndarray
    bit_depth: int
    report: EditReport
    dicom: DicomSource | None = None

    def files(self, uid_seed: str | None = None) -> dict[str, bytes]:
        """The result files by name, exactly the report's
        :attr:`~models.request.report.EditReport.file_names` (the request's ``outputs``). Only
        those are encoded: a real-size study's full set is tens of megabytes. The DICOM ones are
        Secondary Captures and a structured report in the input's study, their UIDs derived from
        ``uid_seed`` when given (a job's id: a job's outputs stored twice are one copy)."""
        names = self.report.file_names
        encoders: dict[str, Callable[[], bytes]] = {
            "counterfactual.png": lambda: encode_png(self.counterfactual, self.bit_depth),
            "difference.png": lambda: encode_rgb_png(self.difference_rgb),
            "difference.npy": lambda: encode_npy(self.difference),
            "reconstruction.png": lambda: encode_png(self.reconstruction, self.bit_depth),
            "result.json": lambda: encode_report(self.report),
        }
        files = {name: encoders[name]() for name in names if name in encoders}
        if self.dicom is not None and set(DICOM_FILES) & set(names):
            description = (
                f"PRISM counterfactual (S_CLIP {self.report.s_clip:.3f}): {self.report.original_prompt!r} "
                f"edited to {self.report.edit_prompt!r}"
            )
            report = self.report
            findings = Findings(
                s_clip=report.s_clip,
                threshold=report.s_clip_threshold,
                passed=report.passed,
                original_prompt=report.original_prompt,
                edit_prompt=report.edit_prompt,
                method=report.method,
                model=report.model.identity,
            )
            files |= dicom_outputs(
                self.dicom, self.counterfactual, self.difference_rgb, description, findings, uid_seed
            )
        return {name: files[name] for name in names}


def encode_report(report: EditReport) -> bytes:
    """``result.json``."""
    return report.model_dump_json(indent=2).encode()


def encode_npy(array: np.ndarray) -> bytes:
    """``array`` as float32 in NumPy's .npy format."""
    buf = io.BytesIO()
    np.save(buf, array.astype(np.float32))
    return buf.getvalue()


@dataclass(frozen=True)
class PackItem:
    """One counterfactual of a pack: the decoded input, the resolved edit, its progress callback
    and, for ``guided``, the anatomy to keep (an image-sized mask, True = keep)."""

    image: DecodedImage
    edit: ResolvedEdit
    callback: ProgressCallback | None = None
    keep: np.ndarray | None = None


def pack_key(params: EditParams) -> Hashable | None:
    """Edits with equal keys can run as one pack (:func:`generate_counterfactuals`); None for an
    edit whose method runs one image at a time."""
    method = METHODS[params.method]
    return (params.method, method.pack_key(params)) if isinstance(method, PackMethod) else None


def generate_counterfactual(
    bundle: ModelBundle,
    image: DecodedImage,
    edit: ResolvedEdit,
    *,
    cache: InversionCache | None = None,
    callback: ProgressCallback | None = None,
    keep: np.ndarray | None = None,
    classifier: FindingClassifier | None = None,
) -> Counterfactual:
    """A counterfactual of ``image`` by ``edit.params.method``, scored with S_CLIP against the
    reconstruction and mapped back to the input's geometry.

    ``prism`` makes one candidate per self_replace value and keeps the one with the highest S_CLIP;
    ``sdedit`` and ``guided`` make one; ``guided`` needs a ``classifier`` and keeps the anatomy
    where ``keep`` (an image-sized mask, True = keep) is set. Raises what stopped it: the
    callback's exception, or the engine's :class:`InvalidInput` for the request.
    """
    (result,) = generate_counterfactuals(
        bundle, [PackItem(image, edit, callback, keep)], cache=cache, classifier=classifier
    )
    if isinstance(result, Exception):
        raise result
    return result


def generate_counterfactuals(
    bundle: ModelBundle,
    items: Sequence[PackItem],
    *,
    cache: InversionCache | None = None,
    classifier: FindingClassifier | None = None,
) -> list[Counterfactual | Exception]:
    """The counterfactuals of several inputs run as one pack (their edits share a :func:`pack_key`;
    one item may have any), each as :func:`generate_counterfactual` would make it alone.

    An item leaves the pack without stopping the others when its callback raises
    :class:`~models.diffusion.packing.LeavePack` (a canceled job) or the engine finds its own
    input unusable (:class:`InvalidInput`, :class:`ImageError`): its place in the result holds that
    exception. Any other exception stops the whole pack. Timings are the pack's: an item is
    charged each phase it took part in.
    """
    keys = {pack_key(item.edit.params) for item in items}
    if len(items) > 1 and (len(keys) > 1 or None in keys):
        raise ValueError("these edits cannot share a pack: see pack_key")
    progress = PackProgress([item.callback for item in items])
    timers = [PhaseTimer(bundle.device) for _ in items]
    sources: list[Source] = []
    for index, item in enumerate(items):
        model_image, geometry = to_model_input(item.image.pixels, bundle.resolution)
        sources.append(Source(model_image, geometry, item.edit.original_prompt, item.edit.edit_prompt, item.keep))
        if item.keep is not None and item.keep.shape != item.image.pixels.shape:
            shapes = item.keep.shape[::-1], item.image.pixels.shape[::-1]
            progress.fail(index, InvalidInput("mask", "the mask is {} pixels, the image {}".format(*shapes)))
    contexts = [
        RunContext(bundle, item.edit.params, timer, progress=item.callback, cache=cache, classifier=classifier)
        for item, timer in zip(items, timers, strict=True)
    ]
    method = METHODS[items[0].edit.params.method]
    edits = _run(method, sources, contexts, progress)
    results: list[Counterfactual | Exception] = []
    for index, item in enumerate(items):
        if index not in progress.left:
            try:
                results.append(_finish(bundle, item, sources[index], edits[index], timers[index], len(items)))
                continue
            except LeavePack as exc:  # left while being scored
                progress.fail(index, exc)
        results.append(progress.left[index])
    return results


ITEM_ERRORS = (LeavePack, InvalidInput, ImageError)
"""What ends one item of a pack, not the pack."""


def _run(
    method: Method | PackMethod, sources: list[Source], contexts: list[RunContext], progress: PackProgress
) -> dict[int, Edit]:
    """The method's edits of the items still in ``progress``, by item."""
    if isinstance(method, PackMethod):
        return method.run_pack(sources, contexts, progress) if progress.alive else {}
    edits = {}
    for index in progress.alive:
        try:
            edits[index] = method.run(sources[index], contexts[index])
        except ITEM_ERRORS as exc:
            progress.fail(index, exc)
    return edits


def _finish(
    bundle: ModelBundle, item: PackItem, source: Source, result: Edit, timer: PhaseTimer, pack_size: int
) -> Counterfactual:
    """Decode one item's candidates, score them, keep the best, map it back to the input, report."""
    image, edit, callback = item.image, item.edit, item.callback
    params = edit.params
    images = timer.measure("decode", lambda: decode_latents(bundle.vae, result.latents).cpu())
    regions = edited_regions(result.latents, bundle.resolution).cpu()
    if callback:
        callback("scoring", 0, 1)
    scorer = ClipScorer(bundle.clip, bundle.device)
    scores = timer.measure(
        "scoring", lambda: score_candidates(scorer, images[:1], images[1:], edit.original_prompt, result.edit_prompts)
    )
    best = max(range(len(scores)), key=lambda k: scores[k].s_clip)
    if callback:
        callback("scoring", 1, 1)
    outputs = map_outputs(image, source.geometry, images[0, 0], images[1 + best, 0], regions[best], params.output)
    report = edit_report(
        result=result,
        best=best,
        scores=scores,
        outputs=outputs,
        params=params,
        bundle=bundle,
        image=image,
        geometry=source.geometry,
        timings=timer.timings,
        pack_size=pack_size,
        original_prompt=edit.original_prompt,
    )
    return Counterfactual(
        original=image.pixels,
        counterfactual=outputs.counterfactual,
        reconstruction=outputs.reconstruction,
        difference=outputs.difference,
        difference_rgb=outputs.difference_rgb,
        bit_depth=image.bit_depth,
        report=report,
        dicom=image.dicom,
    )


def edited_regions(latents: torch.Tensor, size: int) -> torch.Tensor:
    """(K, size, size) in {0, 1}: where each candidate's final latent differs from the source's.

    LocalBlend keeps a candidate's latent bit-equal to the source's outside its mask, yet the
    VAE decoder's group normalisation spreads any local latent change over the whole decoded
    image. The residual output therefore adds the edit's effect only where the latent changed.
    """
    changed = (latents[1:] != latents[:1]).any(1, keepdim=True).float()
    return F.interpolate(changed, size=(size, size), mode="nearest")[:, 0]


def map_outputs(
    image: DecodedImage,
    geometry: Geometry,
    reconstructed: torch.Tensor,
    edited: torch.Tensor,
    region: torch.Tensor,
    output: str,
) -> Outputs:
    """The model-size reconstruction, edit and edited region mapped to the input: ``residual`` adds
    the edit's effect to the input inside the region, ``decoded`` is the decoded edit itself."""
    edited_px = from_model_output(edited, geometry)
    reconstructed_px = from_model_output(reconstructed, geometry)
    region_px = from_model_output(region, geometry)
    if output == "residual":
        edited_px = image.pixels + region_px * (edited_px - reconstructed_px)
    counterfactual = quantize(edited_px, image.bit_depth)
    diff = difference(counterfactual, image.pixels)
    diff_rgb, scale = render_difference(diff)
    return Outputs(
        counterfactual=counterfactual,
        reconstruction=quantize(reconstructed_px, image.bit_depth),
        difference=diff,
        difference_rgb=diff_rgb,
        difference_png_scale=scale,
        edited_fraction=float(region_px.mean()),
    )


def edit_report(
    *,
    result: Edit,
    best: int,
    scores: list[EditScores],
    outputs: Outputs,
    params: EditParams,
    bundle: ModelBundle,
    image: DecodedImage,
    geometry: Geometry,
    timings: dict[str, float],
    original_prompt: str,
    pack_size: int,
) -> EditReport:
    """What ``result.json`` and the job status say about the kept candidate ``best``."""
    chosen = scores[best]
    return EditReport(
        method=params.method,
        s_clip=chosen.s_clip,
        passed=chosen.s_clip >= params.s_clip_threshold,
        s_clip_threshold=params.s_clip_threshold,
        similarities=chosen,
        score_reference=SCORE_REFERENCE,
        chosen_self_replace=result.self_replace[best],
        candidates=[
            CandidateScores(self_replace_steps=s, **sc.model_dump())
            for s, sc in zip(result.self_replace, scores, strict=True)
        ],
        timings=timings,
        pack_size=pack_size,
        parameters=params,
        model=ModelInfo(
            identity=bundle.identity,
            resolution=bundle.resolution,
            device=str(bundle.device),
            dtype=str(bundle.dtype),
            compile=bundle.compile,
        ),
        geometry=geometry,
        bit_depth=image.bit_depth,
        input_format=image.format,
        input_colour=image.colour,
        original_prompt=original_prompt,
        edit_prompt=result.edit_prompts[best],
        inversion=result.inversion,
        anatomy_mask=result.anatomy_mask,
        blend_threshold=result.blend_threshold,
        edited_fraction=outputs.edited_fraction,
        difference=DifferenceInfo(min=float(outputs.difference.min()), max=float(outputs.difference.max())),
        difference_png_scale=outputs.difference_png_scale,
    )
