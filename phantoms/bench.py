"""``prism bench-phantom``: counterfactuals on held-out phantoms, measured against the truth.

Real patients have no true counterfactual; phantoms do. For each task a held-out anatomy (seeds
never used in training) is rendered with the finding in its source state; the engine edits it
with the explicit captions (one word changes: "with" <-> "without"); the result is compared with
the same anatomy rendered with the finding toggled.

Several named variants (edit parameters, methods) run on the same cases, side by side. Each case
is saved as it finishes, in the folder layout ``prism evaluate`` reads (``input/``, ``truth/``,
``counterfactual/``, ``cases.json``), so an interrupted run resumes where it stopped and every
variant is measured by the same evaluation (:mod:`models.evaluation.quality`) against the truth.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from tqdm import tqdm

from models.diffusion.components import ModelBundle, decode_latents, encode_latent
from models.diffusion.inversion import InversionCache
from models.evaluation.quality import evaluate, l1_ratio, load_cases
from models.imaging.files import DecodedImage, decode_image, encode_png
from models.pipeline import Counterfactual, generate_counterfactual
from models.request.params import EditParams
from models.request.resolve import ResolvedEdit
from models.scoring.classifier import FindingClassifier
from models.scoring.clip import ClipScorer
from phantoms.captions import NAMES, explicit_caption
from phantoms.render import FINDINGS, Anatomy, Findings, anatomy_mask, region_mask, render

HELD_OUT_SEED = 1_000_000
SPLITS = {"test": range(0, 500), "validation": range(500, 1000)}
"""Phantom indices per task of each split. Results are reported on ``test`` (docs/bench, the model
card); settings stored with a model, such as its LocalBlend thresholds, are chosen on ``validation``
so that the reported numbers are not tuned on the cases they are measured on."""
TASKS = {
    "remove_devices": ("support_devices", True),
    "add_devices": ("support_devices", False),
    "remove_effusion": ("pleural_effusion", True),
    "remove_cardiomegaly": ("cardiomegaly", True),
}
CASE_FIELDS = ("original_prompt", "edit_prompt", "targets")
PHANTOM_MEASURES = ("identity_ratio", "outside_change", "outside_edit_change", "seconds")


def bench_case(task: str, index: int, size: int = 128) -> tuple[Anatomy, Findings, Findings, str]:
    """Held-out anatomy, source findings, target findings and the toggled finding of one case."""
    finding, source_state = TASKS[task]
    if not 0 <= index < 1000:
        raise ValueError(f"phantom index must be 0 to 999, got {index}")
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
    return decode_latents(bundle.vae, encode_latent(bundle.vae, x))[0, 0].cpu().numpy()


METHOD_VARIANTS: dict[str, dict[str, dict]] = {
    "prism": {"paper": {}, "tuned": {"inversion": "direct"}},
    "sdedit": {
        "paper": {"method": "sdedit", "steps": 75, "strength": 0.85, "guidance_scale": 7.5},
        "tuned": {"method": "sdedit", "steps": 75, "strength": 0.55, "guidance_scale": 4.0},
    },
    "guided": {
        "paper": {"method": "guided", "guidance_scale": 1.0},
        "tuned": {"method": "guided", "guidance_scale": 1.0, "classifier_weight": 1.0, "l1_weight": 30.0},
    },
}
"""Each method at its paper's settings and at one tuned setting (docs/bench/methods explains why)."""


def truth_latent_ratio(bundle: ModelBundle, task: str, index: int) -> float:
    """The L1 ratio of an edit that reached the truth's latent and changed nothing outside the
    finding's region, under the residual output: the input plus, inside the region, the truth's VAE
    round trip minus the input's.

    This is how close the VAE lets an edit get. It is a reference rather than a strict floor, since
    a latent optimised through the decoder can beat the encoder's. A thin lead keeps only a blurred
    copy of itself in the round trip, so removing one leaves its edges behind even for a perfect
    edit.
    """
    anatomy, source, target, finding = bench_case(task, index, bundle.resolution)
    original, truth = render(anatomy, source), render(anatomy, target)
    region = region_mask(anatomy, finding)
    reached = np.clip(original + region * (_vae_roundtrip(bundle, truth) - _vae_roundtrip(bundle, original)), 0, 1)
    return l1_ratio(reached, original, truth)


def method_variants(base: EditParams, methods: Sequence[str]) -> dict[str, EditParams]:
    """``{method}`` and ``{method}-tuned`` for each method, over the options in ``base``."""
    return {
        (method if setting == "paper" else f"{method}-{setting}"): base.replace(**overrides)
        for method in methods
        for setting, overrides in METHOD_VARIANTS[method].items()
    }


def varied(base: EditParams, varies: Sequence[str]) -> dict[str, EditParams]:
    """One variant per value of each ``OPTION=V1,V2``, named by the value; a variant equal to an
    earlier one runs once (``inversion=null_text,direct`` and ``blend_edit_maps=own,replaced`` make
    three: the defaults, direct and own)."""
    variants: dict[str, EditParams] = {}
    for vary in varies:
        option, equals, values = vary.partition("=")
        if not equals or not option or not values:
            raise ValueError(f"--vary {vary}: expected OPTION=V1,V2 (an edit option, e.g. blend_threshold=0.3,0.5)")
        if option not in EditParams.model_fields:
            raise ValueError(f"--vary {vary}: {option!r} is not an edit option; see prism bench-phantom --help")
        for value in values.split(","):
            try:
                candidate = base.replace(**{option: value})
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ValueError(f"--vary {vary}: {option}={value}: {first['msg']}") from exc
            if candidate not in variants.values():
                variants[value] = candidate
    return variants


def measure_case(
    bundle: ModelBundle, classifier: FindingClassifier, task: str, index: int, params: EditParams, cache: InversionCache
) -> tuple[dict, Counterfactual]:
    """The phantom-only measures of one case (those needing the anatomy or the reconstruction), its
    prompts and targets, and the counterfactual."""
    anatomy, source, target, finding = bench_case(task, index, bundle.resolution)
    original = render(anatomy, source)
    mask = region_mask(anatomy, finding)
    targets = {NAMES[finding]: int(getattr(target, finding))}
    case_params = params.replace(blend_words=(NAMES[finding].lower(),), classifier_targets=targets)
    prompts = {"original_prompt": explicit_caption(source), "edit_prompt": explicit_caption(target)}
    start = time.perf_counter()
    cf = generate_counterfactual(
        bundle,
        DecodedImage(original, 16),
        ResolvedEdit(
            original_prompt=prompts["original_prompt"], edit_prompt=prompts["edit_prompt"], params=case_params
        ),
        cache=cache,
        keep=anatomy_mask(anatomy),
        classifier=classifier,
    )
    seconds = time.perf_counter() - start
    vae_error = _l1(_vae_roundtrip(bundle, original), original)
    row = {
        **prompts,
        "targets": targets,
        "identity_ratio": _l1(cf.reconstruction, original) / max(vae_error, 1e-6),
        "outside_change": _l1(cf.counterfactual, original, ~mask),
        "outside_edit_change": _l1(cf.counterfactual, cf.reconstruction, ~mask),
        "seconds": seconds,
    }
    return row, cf


def _save(folder: Path, kind: str, name: str, pixels: np.ndarray) -> None:
    (folder / kind).mkdir(parents=True, exist_ok=True)
    (folder / kind / f"{name}.png").write_bytes(encode_png(pixels, 16))


def case_indices(n: int, split: str = "test") -> range:
    """The first ``n`` phantom indices of a split (a case is named by its index, so two splits
    never share a saved case)."""
    indices = SPLITS[split]
    if not 1 <= n <= len(indices):
        raise ValueError(f"n must be 1 to {len(indices)} for the {split} split, got {n}")
    return indices[:n]


def generate_cases(
    bundle: ModelBundle,
    classifier: FindingClassifier,
    indices: Sequence[int],
    out: Path,
    variants: Mapping[str, EditParams],
    tasks: Sequence[str] = tuple(TASKS),
) -> None:
    """Every variant on the held-out phantoms ``indices`` of each task, each case saved under
    ``out/cases/{variant}/{task}`` as it finishes; cases already there are kept."""
    cache = InversionCache(out / "inversions")
    for name, params in variants.items():
        for task in tasks:
            folder = out / "cases" / name / task
            for i in tqdm(indices, desc=f"{name} {task}"):
                case = f"{i:03d}"
                if (folder / "measures" / f"{case}.json").exists():
                    continue
                row, cf = measure_case(bundle, classifier, task, i, params, cache)
                anatomy, source, target, _ = bench_case(task, i, bundle.resolution)
                _save(folder, "input", case, render(anatomy, source))
                _save(folder, "truth", case, render(anatomy, target))
                _save(folder, "counterfactual", case, cf.counterfactual)
                (folder / "measures").mkdir(exist_ok=True)
                (folder / "measures" / f"{case}.json").write_text(json.dumps({**row, "s_clip": cf.report.s_clip}))


def run_benchmark(
    bundle: ModelBundle,
    classifier: FindingClassifier,
    n: int,
    out: Path,
    variants: Mapping[str, EditParams],
    tasks: Sequence[str] = tuple(TASKS),
    grid_rows: int = 3,
    inception: Path | None = None,
    split: str = "test",
) -> dict:
    """Generate the first ``n`` cases of ``split`` (resuming), evaluate each variant and task
    against the truth with :func:`models.evaluation.quality.evaluate`, and write results.json, results.md
    and grid.png."""
    out.mkdir(parents=True, exist_ok=True)
    indices = case_indices(n, split)
    generate_cases(bundle, classifier, indices, out, variants, tasks)
    scorer = ClipScorer(bundle.clip, bundle.device)
    references = {task: float(np.mean([truth_latent_ratio(bundle, task, i) for i in indices])) for task in tasks}
    results: dict[str, dict] = {}
    for name, params in variants.items():
        results[name] = {"parameters": params.model_dump(), "tasks": {}}
        for task in tasks:
            folder = out / "cases" / name / task
            names = [f"{i:03d}" for i in indices]
            rows = [json.loads((folder / "measures" / f"{c}.json").read_text()) for c in names]
            manifest = {c: {k: r[k] for k in CASE_FIELDS} for c, r in zip(names, rows, strict=True)}
            (folder / "cases.json").write_text(json.dumps(manifest, indent=1))
            cases = load_cases(folder, names)
            evaluation = evaluate(cases, scorer, classifier, inception, desc=f"evaluate {name} {task}")
            phantom = {m: float(np.mean([r[m] for r in rows])) for m in PHANTOM_MEASURES}
            results[name]["tasks"][task] = {
                **evaluation.summary.model_dump(),
                **phantom,
                "truth_latent_ratio": references[task],
            }
    report = {"variants": results, "model": bundle.identity, "device": str(bundle.device), "split": split}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    _grid(out, list(variants), tasks, indices[:grid_rows]).save(out / "grid.png")
    return report


def _grid(out: Path, variants: list[str], tasks: Sequence[str], rows: Sequence[int]) -> Image.Image:
    """Per case: input | truth | each variant's counterfactual | each variant's difference (grey = 0)."""

    def read(variant: str, task: str, kind: str, i: int) -> np.ndarray:
        return decode_image((out / "cases" / variant / task / kind / f"{i:03d}.png").read_bytes()).pixels

    lines = []
    for task in tasks:
        for i in rows:
            original, truth = read(variants[0], task, "input", i), read(variants[0], task, "truth", i)
            edits = [read(v, task, "counterfactual", i) for v in variants]
            diffs = [np.clip(0.5 + e - original, 0, 1) for e in edits]
            lines.append(np.concatenate([original, truth, *edits, *diffs], axis=1))
    return Image.fromarray(np.round(np.concatenate(lines, axis=0) * 255).astype(np.uint8), mode="L")


COLUMNS = (
    # (measure, format, column label)
    ("l1_ratio", ".2f", "L1 ratio"),
    ("truth_latent_ratio", ".2f", "truth's latent"),
    ("l1_input", ".4f", "L1 to input"),
    ("flip_rate", ".2f", "flip rate"),
    ("probability_change", "+.2f", "Δp"),
    ("ssim_input", ".3f", "SSIM"),
    ("ms_ssim_input", ".3f", "MS-SSIM"),
    ("clip_accuracy", ".2f", "CLIP acc."),
    ("esas", ".5f", "ESAS"),
    ("s_clip", ".3f", "S_CLIP"),
    ("frechet_clip", ".3f", "Fréchet (CLIP)"),
    ("identity_ratio", ".2f", "identity / VAE"),
    ("outside_change", ".4f", "outside change"),
    ("seconds", ".1f", "s"),
)


def _cell(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(results: dict) -> str:
    labels = ["variant", "task", "n", *(label for _, _, label in COLUMNS)]
    head = "| " + " | ".join(labels) + " |\n" + "| --- " * len(labels) + "|\n"
    rows = "".join(
        "| " + " | ".join([name, t, str(r["n"]), *(_cell(r[key], spec) for key, spec, _ in COLUMNS)]) + " |\n"
        for name, variant in results.items()
        for t, r in variant["tasks"].items()
    )
    settings = "".join(
        f"- {name}: method {p['method']}, {p['steps']} steps, guidance {p['guidance_scale']}"
        + (
            f", inversion {p['inversion']}, self_replace {p['self_replace_steps']}, null-text inner steps "
            f"{p['null_text']['inner_steps']}, LocalBlend maps {p['blend_edit_maps']}"
            if p["method"] == "prism"
            else f", strength {p['strength']}"
            if p["method"] == "sdedit"
            else f", classifier weight {p['classifier_weight']}, L1 weight {p['l1_weight']}, anatomy mask"
        )
        + f", output {p['output']}\n"
        for name, p in ((name, variant["parameters"]) for name, variant in results.items())
    )
    note = (
        "\nL1 ratio: L1(counterfactual, truth) / L1(input, truth), below 1 is closer to the truth than the input. "
        "Truth's latent: the L1 ratio of an edit that reached the truth's latent and changed nothing outside the "
        "finding's region (the input plus, there, the truth's VAE round trip minus the input's), what the VAE "
        "lets an edit reach. "
        "SSIM and MS-SSIM between the counterfactual and the input (seed 004). CLIP accuracy and ESAS as seed 003 "
        "defines them, with the model's CLIP and the case's two captions. Fréchet (CLIP): the Fréchet distance "
        "between the CLIP image features of the counterfactuals and of the truths (not FID: no Inception weights). "
        "Identity / VAE: the reconstruction's L1 to the input over the VAE round trip's. Outside change: mean "
        "|counterfactual - input| outside the finding's region.\n\nGrid rows: input | truth | each variant's "
        "counterfactual | each variant's difference from the input (grey = 0), variants in the table's order.\n"
    )
    return head + rows + "\n" + settings + note
