"""``prism bench-phantom``: counterfactuals on held-out phantoms, measured against the truth.

Real patients have no true counterfactual; phantoms do. For each task a held-out anatomy (seeds
never used in training) is rendered with the finding in its source state; the engine edits it
with the explicit captions (one word changes: "with" <-> "without"); the result is compared with
the same anatomy rendered with the finding toggled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.geometry import DecodedImage
from models.inversion import InversionCache
from models.loading import ModelBundle
from models.params import EditParams
from models.pipeline import generate_counterfactual
from phantoms.captions import NAMES, explicit_caption
from phantoms.classifier import FindingClassifier
from phantoms.render import FINDINGS, Anatomy, Findings, region_mask, render

HELD_OUT_SEED = 1_000_000
TASKS = {
    "remove_devices": ("support_devices", True),
    "add_devices": ("support_devices", False),
    "remove_effusion": ("pleural_effusion", True),
    "remove_cardiomegaly": ("cardiomegaly", True),
}


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
    from models.pipeline import decode_latents, encode_latent

    x = torch.from_numpy(pixels)[None, None]
    return decode_latents(bundle, encode_latent(bundle, x))[0, 0].cpu().numpy()


def run_benchmark(
    bundle: ModelBundle,
    classifier: FindingClassifier,
    n: int,
    out: Path,
    params: EditParams,
    tasks: Sequence[str] = tuple(TASKS),
    grid_rows: int = 3,
) -> dict:
    """Run every task on ``n`` held-out phantoms; write results.json, results.md and grid.png."""
    out.mkdir(parents=True, exist_ok=True)
    cache = InversionCache(out / "inversions")
    results, grid = {}, []
    for task in tasks:
        rows = []
        for i in range(n):
            anatomy, source, target, finding = bench_case(task, i, bundle.resolution)
            original, truth = render(anatomy, source), render(anatomy, target)
            mask = region_mask(anatomy, finding)
            task_params = params.replace(blend_words=(NAMES[finding].lower(),))
            start = time.perf_counter()
            cf = generate_counterfactual(
                bundle,
                DecodedImage(original, 16),
                explicit_caption(source),
                explicit_caption(target),
                task_params,
                cache=cache,
            )
            seconds = time.perf_counter() - start
            with torch.no_grad():
                prob = torch.sigmoid(classifier(torch.from_numpy(cf.counterfactual)[None, None]))[0]
            flipped = bool(prob[FINDINGS.index(finding)] > 0.5) == getattr(target, finding)
            vae_error = _l1(_vae_roundtrip(bundle, original), original)
            rows.append(
                {
                    "identity_ratio": _l1(cf.reconstruction, original) / max(vae_error, 1e-6),
                    "l1_ratio": _l1(cf.counterfactual, truth) / max(_l1(original, truth), 1e-6),
                    "flip": float(flipped),
                    "outside_change": _l1(cf.counterfactual, original, ~mask),
                    "outside_edit_change": _l1(cf.counterfactual, cf.reconstruction, ~mask),
                    "s_clip": cf.report.s_clip,
                    "seconds": seconds,
                }
            )
            if i < grid_rows:
                diff = np.clip(0.5 + cf.difference, 0, 1)
                grid.append(np.concatenate([original, cf.counterfactual, truth, diff], axis=1))
        results[task] = {
            "identity_ratio": float(np.mean([r["identity_ratio"] for r in rows])),
            "l1_ratio": float(np.mean([r["l1_ratio"] for r in rows])),
            "flip_rate": float(np.mean([r["flip"] for r in rows])),
            "outside_change": float(np.mean([r["outside_change"] for r in rows])),
            "outside_edit_change": float(np.mean([r["outside_edit_change"] for r in rows])),
            "s_clip": float(np.mean([r["s_clip"] for r in rows])),
            "seconds": float(np.mean([r["seconds"] for r in rows])),
            "n": n,
        }
    report = {
        "tasks": results,
        "parameters": params.model_dump(),
        "model": bundle.identity,
        "device": str(bundle.device),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown_table(results, params))
    Image.fromarray(np.round(np.concatenate(grid, axis=0) * 255).astype(np.uint8), mode="L").save(out / "grid.png")
    return report


def markdown_table(results: dict, params: EditParams) -> str:
    head = (
        "| task | n | identity / VAE | L1 ratio | flip rate | outside change | outside (edit only) | S_CLIP | s |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = "".join(
        f"| {t} | {r['n']} | {r['identity_ratio']:.2f} | {r['l1_ratio']:.2f} | {r['flip_rate']:.2f} | "
        f"{r['outside_change']:.4f} | {r['outside_edit_change']:.4f} | {r['s_clip']:.3f} | {r['seconds']:.1f} |\n"
        for t, r in results.items()
    )
    note = (
        f"\nSteps {params.steps}, guidance {params.guidance_scale}, self_replace {list(params.self_replace_steps)}, "
        f"null-text inner steps {params.null_text.inner_steps}. Grid columns: input | counterfactual | truth | "
        "difference (grey = 0).\n"
    )
    return head + rows + note
