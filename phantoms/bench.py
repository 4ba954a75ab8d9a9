"""``prism bench-phantom``: counterfactuals on held-out phantoms, measured against the truth.

Real patients have no true counterfactual; phantoms do. For each task a held-out anatomy (seeds
never used in training) is rendered with the finding in its source state; the engine edits it
with the explicit captions (one word changes: "with" <-> "without"); the result is compared with
the same anatomy rendered with the finding toggled.

Several named variants (edit parameters) run on the same cases, side by side. Each case's
measures are saved as it finishes, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.classifier import FindingClassifier
from models.geometry import DecodedImage
from models.inversion import InversionCache
from models.loading import ModelBundle
from models.params import EditParams
from models.pipeline import decode_latents, encode_latent, generate_counterfactual
from phantoms.captions import NAMES, explicit_caption
from phantoms.render import FINDINGS, Anatomy, Findings, anatomy_mask, region_mask, render

HELD_OUT_SEED = 1_000_000
TASKS = {
    "remove_devices": ("support_devices", True),
    "add_devices": ("support_devices", False),
    "remove_effusion": ("pleural_effusion", True),
    "remove_cardiomegaly": ("cardiomegaly", True),
}
MEASURES = ("identity_ratio", "l1_ratio", "flip", "outside_change", "outside_edit_change", "s_clip", "seconds")


def bench_case(task: str, index: int, size: int = 128) -> tuple[Anatomy, Findings, Findings, str]:
    """Held-out anatomy, source findings, target findings and the toggled finding of one case."""
    finding, source_state = TASKS[task]
    seed = HELD_OUT_SEED + 1000 * list(TASKS).index(task) + index
    rng = np.random.default_rng(seed)
    others = {n: bool(rng.random() < 0.5) for n in FINDINGS if n != finding}
    source = Findings(**others, **{finding: source_state})
    return Anatomy.sample(seed, size), source, source.toggled(finding), finding


def _l1(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    d = np.abs(a - b)
    return float(d[mask].mean() if mask is not None else d.mean())


@torch.no_grad()
def _vae_roundtrip(bundle: ModelBundle, pixels: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(pixels)[None, None]
    return decode_latents(bundle, encode_latent(bundle, x))[0, 0].cpu().numpy()


def measure_case(
    bundle: ModelBundle, classifier: FindingClassifier, task: str, index: int, params: EditParams, cache: InversionCache
) -> tuple[dict[str, float], np.ndarray]:
    """The measures of one case and its counterfactual."""
    anatomy, source, target, finding = bench_case(task, index, bundle.resolution)
    original, truth = render(anatomy, source), render(anatomy, target)
    mask = region_mask(anatomy, finding)
    case_params = params.replace(
        blend_words=(NAMES[finding].lower(),), classifier_targets={NAMES[finding]: int(getattr(target, finding))}
    )
    start = time.perf_counter()
    cf = generate_counterfactual(
        bundle,
        DecodedImage(original, 16),
        explicit_caption(source),
        explicit_caption(target),
        case_params,
        cache=cache,
        keep=anatomy_mask(anatomy),
        classifier=classifier,
    )
    seconds = time.perf_counter() - start
    with torch.no_grad():
        prob = classifier.probabilities(torch.from_numpy(cf.counterfactual)[None, None])[NAMES[finding]][0]
    flipped = bool(prob > 0.5) == getattr(target, finding)
    vae_error = _l1(_vae_roundtrip(bundle, original), original)
    row = {
        "identity_ratio": _l1(cf.reconstruction, original) / max(vae_error, 1e-6),
        "l1_ratio": _l1(cf.counterfactual, truth) / max(_l1(original, truth), 1e-6),
        "flip": float(flipped),
        "outside_change": _l1(cf.counterfactual, original, ~mask),
        "outside_edit_change": _l1(cf.counterfactual, cf.reconstruction, ~mask),
        "s_clip": cf.report.s_clip,
        "seconds": seconds,
    }
    return row, cf.counterfactual


def run_benchmark(
    bundle: ModelBundle,
    classifier: FindingClassifier,
    n: int,
    out: Path,
    variants: Mapping[str, EditParams],
    tasks: Sequence[str] = tuple(TASKS),
    grid_rows: int = 3,
) -> dict:
    """Every variant on ``n`` held-out phantoms per task; writes results.json, results.md, grid.png.

    Cases already measured under ``out/cases`` (same variant name, task and index) are reused.
    """
    out.mkdir(parents=True, exist_ok=True)
    cache = InversionCache(out / "inversions")
    results: dict[str, dict] = {}
    grid_images: dict[tuple[str, str, int], np.ndarray] = {}
    for name, params in variants.items():
        results[name] = {"parameters": params.model_dump(), "tasks": {}}
        for task in tasks:
            rows = []
            for i in tqdm(range(n), desc=f"{name} {task}", leave=False):
                case = out / "cases" / name / task / f"{i:03d}"
                if case.with_suffix(".json").exists():
                    row = json.loads(case.with_suffix(".json").read_text())
                else:
                    row, counterfactual = measure_case(bundle, classifier, task, i, params, cache)
                    case.parent.mkdir(parents=True, exist_ok=True)
                    if i < grid_rows:
                        np.save(case.with_suffix(".npy"), counterfactual)
                    case.with_suffix(".json").write_text(json.dumps(row))
                if i < grid_rows:
                    grid_images[name, task, i] = np.load(case.with_suffix(".npy"))
                rows.append(row)
            summary = {m: float(np.mean([r[m] for r in rows])) for m in MEASURES}
            results[name]["tasks"][task] = {**summary, "flip_rate": summary.pop("flip"), "n": n}
    report = {"variants": results, "model": bundle.identity, "device": str(bundle.device)}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    _grid(bundle, grid_images, list(variants), tasks, grid_rows).save(out / "grid.png")
    return report


def _grid(bundle: ModelBundle, images: dict, variants: list[str], tasks: Sequence[str], rows: int) -> Image.Image:
    """Per case: input | truth | each variant's counterfactual | each variant's difference (grey = 0)."""
    lines = []
    for task in tasks:
        for i in range(rows):
            anatomy, source, target, _ = bench_case(task, i, bundle.resolution)
            original = render(anatomy, source)
            edits = [images[v, task, i] for v in variants if (v, task, i) in images]
            diffs = [np.clip(0.5 + e - original, 0, 1) for e in edits]
            lines.append(np.concatenate([original, render(anatomy, target), *edits, *diffs], axis=1))
    return Image.fromarray(np.round(np.concatenate(lines, axis=0) * 255).astype(np.uint8), mode="L")


def markdown_table(results: dict) -> str:
    head = (
        "| variant | task | n | identity / VAE | L1 ratio | flip rate | outside change | outside (edit only) "
        "| S_CLIP | s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = "".join(
        f"| {name} | {t} | {r['n']} | {r['identity_ratio']:.2f} | {r['l1_ratio']:.2f} | {r['flip_rate']:.2f} | "
        f"{r['outside_change']:.4f} | {r['outside_edit_change']:.4f} | {r['s_clip']:.3f} | {r['seconds']:.1f} |\n"
        for name, variant in results.items()
        for t, r in variant["tasks"].items()
    )
    settings = "".join(
        f"- {name}: inversion {p['inversion']}, {p['steps']} steps, guidance {p['guidance_scale']}, self_replace "
        f"{p['self_replace_steps']}, null-text inner steps {p['null_text']['inner_steps']}, output {p['output']}\n"
        for name, p in ((name, variant["parameters"]) for name, variant in results.items())
    )
    note = (
        "\nGrid rows: input | truth | each variant's counterfactual | each variant's difference from the input "
        "(grey = 0), variants in the table's order.\n"
    )
    return head + rows + "\n" + settings + note
