"""Model building and measuring: ``make-tiny-model``, ``train-builtin``, ``bench-phantom``."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from models.params import EditOptions, EditParams, NullTextSettings
from service.cli.edit import ALIASES
from service.cli.options import add_model_flags, model_from_args


def register(sub: argparse._SubParsersAction) -> None:
    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight model with the SD v1.5 structure")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=make_tiny)

    train = sub.add_parser("train-builtin", help="train the built-in phantom model (resumable)")
    train.add_argument("--work", default=".prism/train", help="checkpoints and cached data")
    train.add_argument(
        "--out", default=".prism/builtin", help="where the model is written (ship it with --out models/assets/builtin)"
    )
    train.add_argument("--images", type=int, help="training phantoms (default: the recipe's)")
    train.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count (quick checks)")
    train.add_argument("--batch", type=int, help="one batch size for every stage (quick checks)")
    train.add_argument("--threads", type=int, default=2)
    train.set_defaults(func=train_builtin, log_level=logging.INFO)

    bench = sub.add_parser("bench-phantom", help="measure edits against true counterfactuals on held-out phantoms")
    bench.add_argument("--n", type=int, default=50, help="phantoms per task")
    bench.add_argument("--out", default="bench-out")
    bench.add_argument("--model", help="model directory with classifier.safetensors (default: built-in)")
    bench.add_argument("--device", choices=["cpu", "cuda"])
    bench.add_argument(
        "--inner-steps",
        type=int,
        default=NullTextSettings().inner_steps,
        help="null-text inner steps (default: %(default)s)",
    )
    add_model_flags(bench.add_argument_group("edit options (as in the API)"), EditOptions, ALIASES)
    bench.set_defaults(func=bench_phantom)


def make_tiny(args: argparse.Namespace) -> int:
    from models.tiny import make_tiny_model

    print(make_tiny_model(args.directory, seed=args.seed))
    return 0


def train_builtin(args: argparse.Namespace) -> int:
    import torch

    from phantoms.training import Recipe
    from phantoms.training import train_builtin as train

    torch.set_num_threads(args.threads)
    recipe = Recipe()
    if args.scale != 1.0 or args.batch:
        recipe = recipe.scaled(args.scale, args.batch)
    if args.images:
        recipe = replace(recipe, images=args.images)
    train(Path(args.work), Path(args.out), recipe)
    return 0


def bench_phantom(args: argparse.Namespace) -> int:
    from models.builtin import builtin_model_dir
    from models.loading import load_bundle
    from phantoms.bench import run_benchmark
    from phantoms.classifier import FindingClassifier

    try:
        options = model_from_args(EditOptions, args)
    except ValueError as exc:
        print(f"prism bench-phantom: error: {exc}")
        return 2
    params = EditParams(**options.model_dump(), null_text=NullTextSettings(inner_steps=args.inner_steps))
    model_dir = Path(args.model) if args.model else builtin_model_dir()
    bundle = load_bundle(model_dir, device=args.device)
    classifier = FindingClassifier.load(model_dir / "classifier.safetensors")
    report = run_benchmark(bundle, classifier, args.n, Path(args.out), params)
    print((Path(args.out) / "results.md").read_text())
    return 0 if report["tasks"] else 1
