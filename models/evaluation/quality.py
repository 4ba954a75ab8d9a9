"""One evaluation for every method: the papers' metrics over input / counterfactual pairs.

- L1 to the input and, when the true counterfactual is known (phantoms), to the truth, with the
  ratio L1(cf, truth) / L1(input, truth) (PRISM's benchmark: below 1 is closer to the truth).
- A finding classifier's probability change toward the target and the flip rate (PRISM):
  a case flips when the classifier's decision on the counterfactual is the target state.
- SSIM and MS-SSIM (seed 004, eqs. 8 and 9) by torchmetrics, counterfactual against input.
- CLIP accuracy and ESAS (seed 003, eqs. 16-18) and S_CLIP (PRISM), with the model's CLIP.
- A Fréchet distance between feature distributions of the counterfactuals and of the truths (or
  the inputs when there is no truth): FID proper with a local Inception file, otherwise the
  same distance on CLIP image features, reported as ``frechet_clip`` and never called FID.

A case folder holds ``input/``, ``counterfactual/`` and optionally ``truth/`` (PNG, JPEG, DICOM
or ``.npy`` in [0, 1], matched by file stem) and an optional ``cases.json``:
``{"<stem>": {"original_prompt": …, "edit_prompt": …, "targets": {"Support Devices": 0}}}``.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from torch import nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm

from models.imaging.files import read_image_file
from models.request.errors import InvalidInput
from models.scoring.classifier import FindingClassifier
from models.scoring.clip import ClipScorer, directional_similarity

KINDS = ("input", "counterfactual", "truth")
SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".npy")
MS_SSIM_SCALES = 5
"""MS-SSIM's five scales (seed 004's reference [61])."""


@dataclass(frozen=True)
class EvalCase:
    """One input / counterfactual pair, what the edit asked for, and the truth if known."""

    name: str
    input: np.ndarray
    counterfactual: np.ndarray
    truth: np.ndarray | None = None
    original_prompt: str | None = None
    edit_prompt: str | None = None
    targets: Mapping[str, int] = field(default_factory=dict)


class CaseScores(BaseModel):
    name: str
    l1_input: float
    l1_truth: float | None
    l1_ratio: float | None
    ssim_input: float
    ms_ssim_input: float
    ssim_truth: float | None
    flip: float | None
    probability_change: float | None
    clip_accuracy: float | None
    esas: float | None
    s_clip: float | None


class EvaluationSummary(BaseModel):
    """Means over the cases (each metric over the cases that have it); None where no case has it."""

    n: int
    l1_input: float
    l1_truth: float | None
    l1_ratio: float | None
    ssim_input: float
    ms_ssim_input: float
    ssim_truth: float | None
    flip_rate: float | None
    probability_change: float | None
    clip_accuracy: float | None
    esas: float | None
    s_clip: float | None
    frechet_clip: float | None
    frechet_reference: str
    fid: float | None


class Evaluation(BaseModel):
    summary: EvaluationSummary
    cases: list[CaseScores]


def _read(path: Path, kind: str) -> np.ndarray:
    if path.suffix != ".npy":
        return read_image_file(path, kind).pixels.astype(np.float32)
    try:
        array = np.load(path)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise InvalidInput(kind, f"{path}: not a NumPy array file ({exc})") from exc
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise InvalidInput(kind, f"{path}: a {array.dtype} array of shape {array.shape}; expected H x W intensities")
    return array.astype(np.float32)


class CaseRecord(BaseModel):
    """One entry of ``cases.json``: what the edit asked for."""

    model_config = ConfigDict(extra="forbid")

    original_prompt: str | None = None
    edit_prompt: str | None = None
    targets: dict[str, Annotated[int, Field(ge=0, le=1)]] = {}


CASES_FILE = TypeAdapter(dict[str, CaseRecord])


def _manifest(path: Path) -> dict[str, CaseRecord]:
    if not path.exists():
        return {}
    try:
        return CASES_FILE.validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidInput("cases.json", f"{path}: {where + ': ' if where else ''}{first['msg']}") from exc


def _find(folder: Path, stem: str) -> Path | None:
    return next((folder / f"{stem}{s}" for s in SUFFIXES if (folder / f"{stem}{s}").exists()), None)


def load_cases(folder: str | Path, names: Sequence[str] | None = None) -> list[EvalCase]:
    """The cases of a folder (layout in the module docstring), every counterfactual with an input."""
    folder = Path(folder)
    for kind in KINDS[:2]:
        if not (folder / kind).is_dir():
            raise InvalidInput(kind, f"{folder / kind} is not a directory")
    manifest = _manifest(folder / "cases.json")
    if names is None:
        names = sorted(p.stem for p in (folder / "counterfactual").iterdir() if p.suffix.lower() in SUFFIXES)
    cases = []
    for name in names:
        paths = {kind: _find(folder / kind, name) for kind in KINDS}
        if paths["input"] is None or paths["counterfactual"] is None:
            raise InvalidInput("input", f"case {name!r} has no input or no counterfactual in {folder}")
        images = {kind: _read(p, kind) if p else None for kind, p in paths.items()}
        for kind, image in images.items():
            if image is not None and image.shape != images["input"].shape:
                raise InvalidInput(kind, f"case {name!r}: {kind} is {image.shape}, input is {images['input'].shape}")
        meta = manifest.get(name, CaseRecord())
        cases.append(
            EvalCase(
                name,
                images["input"],
                images["counterfactual"],
                images["truth"],
                meta.original_prompt,
                meta.edit_prompt,
                meta.targets,
            )
        )
    if not cases:
        raise InvalidInput("counterfactual", f"no images in {folder / 'counterfactual'}")
    return cases


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]


def l1_ratio(image: np.ndarray, original: np.ndarray, truth: np.ndarray) -> float:
    """L1(image, truth) / L1(original, truth): below 1, ``image`` is closer to the truth than the
    original is (guarded against an original equal to its truth)."""
    return float(np.abs(image - truth).mean()) / max(float(np.abs(original - truth).mean()), 1e-6)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity_index_measure(_tensor(a), _tensor(b), data_range=1.0))


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM over five scales with the standard Gaussian window (11 px, sigma 1.5). The coarsest
    scale is 1/16 of the image, so below 176 px the window (and sigma with it) shrinks to the largest
    odd size that scale holds: 7 px (sigma 0.95) at 128 px."""
    side = min(a.shape) // 2 ** (MS_SSIM_SCALES - 1)
    kernel = min(11, side if side % 2 else side - 1)
    if kernel < 3:
        raise InvalidInput("input", f"MS-SSIM needs images of at least {3 * 2 ** (MS_SSIM_SCALES - 1)} pixels")
    value = multiscale_structural_similarity_index_measure(
        _tensor(a), _tensor(b), data_range=1.0, kernel_size=kernel, sigma=1.5 * kernel / 11, normalize="relu"
    )
    return float(value)


def clip_prompts(case: EvalCase, label: str) -> tuple[str, str]:
    """The (target, opposite) prompts of seed 003's CLIP accuracy: the case's own edit and original
    prompts when it has them, else "{label}" and "No {label}" as the paper writes them."""
    if case.original_prompt and case.edit_prompt:
        return case.edit_prompt, case.original_prompt
    positive, negative = label, f"No {label}"
    return (positive, negative) if case.targets[label] == 1 else (negative, positive)


class _ClipFeatures(nn.Module):
    """CLIP image features as a torchmetrics feature extractor (images (N, 1, H, W) in [0, 1])."""

    def __init__(self, scorer: ClipScorer) -> None:
        super().__init__()
        self.scorer = scorer
        self.num_features = int(scorer.image_embeddings(torch.zeros(1, 1, 8, 8)).shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scorer.image_embeddings(images).double().cpu()


class _InceptionFeatures(nn.Module):
    """A local TorchScript Inception-v3 (``inception-2015-12-05.pt`` of StyleGAN3 / clean-fid), called
    as ``model(uint8 RGB NCHW at 299², return_features=True)`` -> (N, 2048)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        if not path.is_file():
            raise InvalidInput("inception", f"no Inception weights at {path}")
        self.model = torch.jit.load(str(path), map_location="cpu").eval()
        self.num_features = int(self(torch.zeros(1, 1, 8, 8)).shape[-1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float().expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", antialias=True)
        features = self.model((x.clamp(0, 1) * 255).round().to(torch.uint8), return_features=True)
        return features.double()


def frechet_distance(features: nn.Module, generated: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Fréchet distance between the feature Gaussians of two image sets (torchmetrics' FID code
    with the given feature extractor)."""
    metric = FrechetInceptionDistance(feature=features, normalize=True)
    metric.update(torch.stack([_tensor(x)[0] for x in reference]), real=True)
    metric.update(torch.stack([_tensor(x)[0] for x in generated]), real=False)
    return float(metric.compute())


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _classifier_scores(classifier: FindingClassifier, case: EvalCase) -> tuple[float, float]:
    """(flip, probability change toward the target), averaged over the case's target labels."""
    images = torch.stack([_tensor(case.input)[0], _tensor(case.counterfactual)[0]])
    with torch.no_grad():
        probs = classifier.probabilities(images)
    flips, changes = [], []
    for label, wanted in case.targets.items():
        if label not in probs:
            raise InvalidInput("targets", f"the classifier has no label {label!r}; it has {sorted(probs)}")
        before, after = float(probs[label][0]), float(probs[label][1])
        flips.append(float((after > 0.5) == bool(wanted)))
        changes.append((after - before) if wanted else (before - after))
    return float(np.mean(flips)), float(np.mean(changes))


def _clip_scores(scorer: ClipScorer, case: EvalCase) -> tuple[float | None, float | None, float | None]:
    """(CLIP accuracy, ESAS, S_CLIP) of one case; S_CLIP is measured from the input image."""
    images = scorer.image_embeddings(torch.stack([_tensor(case.input)[0], _tensor(case.counterfactual)[0]]))
    f_orig, f_gen = images[0], images[1]
    accuracy = esas = s_clip = None
    if case.targets:
        accs, errors = [], []
        for label in case.targets:
            target, opposite = scorer.text_embeddings(clip_prompts(case, label))
            logits = torch.stack([f_gen @ target, f_gen @ opposite])
            accs.append(float(logits.argmax() == 0))
            errors.append(float(((f_gen - (f_orig + target - opposite)) ** 2).mean()))
        accuracy, esas = float(np.mean(accs)), float(np.mean(errors))
    if case.original_prompt and case.edit_prompt:
        t_orig, t_edit = scorer.text_embeddings([case.original_prompt, case.edit_prompt])
        s_clip = float(directional_similarity(f_orig[None], f_gen[None], t_orig[None], t_edit[None])[0])
    return accuracy, esas, s_clip


def evaluate(
    cases: Sequence[EvalCase],
    scorer: ClipScorer | None = None,
    classifier: FindingClassifier | None = None,
    inception: Path | None = None,
    desc: str = "evaluate",
) -> Evaluation:
    """Every metric the inputs allow: classifier metrics need ``classifier`` and targets, CLIP
    metrics ``scorer`` (and prompts or targets), the truth metrics truths, FID ``inception``."""
    rows = []
    for case in tqdm(cases, desc=desc, leave=False):
        l1_input = float(np.abs(case.counterfactual - case.input).mean())
        l1_truth = ratio = ssim_truth = None
        if case.truth is not None:
            l1_truth = float(np.abs(case.counterfactual - case.truth).mean())
            ratio = l1_ratio(case.counterfactual, case.input, case.truth)
            ssim_truth = ssim(case.counterfactual, case.truth)
        flip = change = None
        if classifier is not None and case.targets:
            flip, change = _classifier_scores(classifier, case)
        accuracy, esas, s_clip = _clip_scores(scorer, case) if scorer is not None else (None, None, None)
        rows.append(
            CaseScores(
                name=case.name,
                l1_input=l1_input,
                l1_truth=l1_truth,
                l1_ratio=ratio,
                ssim_input=ssim(case.counterfactual, case.input),
                ms_ssim_input=ms_ssim(case.counterfactual, case.input),
                ssim_truth=ssim_truth,
                flip=flip,
                probability_change=change,
                clip_accuracy=accuracy,
                esas=esas,
                s_clip=s_clip,
            )
        )
    has_truth = all(c.truth is not None for c in cases)
    reference = [c.truth if has_truth else c.input for c in cases]
    generated = [c.counterfactual for c in cases]
    enough = len(cases) >= 2
    summary = EvaluationSummary(
        n=len(cases),
        l1_input=_mean([r.l1_input for r in rows]),
        l1_truth=_mean([r.l1_truth for r in rows]),
        l1_ratio=_mean([r.l1_ratio for r in rows]),
        ssim_input=_mean([r.ssim_input for r in rows]),
        ms_ssim_input=_mean([r.ms_ssim_input for r in rows]),
        ssim_truth=_mean([r.ssim_truth for r in rows]),
        flip_rate=_mean([r.flip for r in rows]),
        probability_change=_mean([r.probability_change for r in rows]),
        clip_accuracy=_mean([r.clip_accuracy for r in rows]),
        esas=_mean([r.esas for r in rows]),
        s_clip=_mean([r.s_clip for r in rows]),
        frechet_clip=frechet_distance(_ClipFeatures(scorer), generated, reference) if scorer and enough else None,
        frechet_reference="truth" if has_truth else "input",
        fid=frechet_distance(_InceptionFeatures(inception), generated, reference) if inception and enough else None,
    )
    return Evaluation(summary=summary, cases=rows)


def markdown(evaluation: Evaluation) -> str:
    """The summary as a two-column table; metrics that could not be computed say why."""
    s = evaluation.summary
    why = {
        "l1_truth": "no truth",
        "l1_ratio": "no truth",
        "ssim_truth": "no truth",
        "flip_rate": "no classifier or targets",
        "probability_change": "no classifier or targets",
        "clip_accuracy": "no targets",
        "esas": "no targets",
        "s_clip": "no prompts",
        "frechet_clip": "fewer than 2 cases",
        "fid": "no Inception weights (--inception)",
    }
    lines = ["| metric | value |", "| --- | --- |"]
    for name, value in s.model_dump().items():
        shown = why.get(name, "-") if value is None else (f"{value:.4f}" if isinstance(value, float) else value)
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines) + (
        f"\n\nFréchet distances compare the counterfactuals with the {s.frechet_reference}s; frechet_clip is on "
        "CLIP image features, not Inception's, so it is not an FID.\n"
    )
