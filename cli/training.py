"""Building models: ``make-tiny-model`` (tests, development), ``train-builtin`` (the built-in phantom
model) and ``finetune`` (PRISM's Algorithm 1 on a local SD model)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from cli.errors import CliError
from cli.options import add_model_flags, model_from_args, positive
from models.request.params import FinetuneConfig
from phantoms.recipe import RECIPES


def register(sub: argparse._SubParsersAction) -> None:
    example = sub.add_parser(
        "make-example",
        help="write the README's example inputs (synthetic): phantom.png, study.dcm, anatomy.png, "
        "and batch.zip, batch.csv and batch/ for batches",
    )
    example.add_argument("directory", nargs="?", default=".", help="where to write them (default: here)")
    example.set_defaults(func=make_example)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight model with the SD v1.5 structure")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=make_tiny)

    train = sub.add_parser("train-builtin", help="train the built-in phantom model (resumable)")
    train.add_argument("--work", default=".prism/train", help="checkpoints and cached data")
    train.add_argument(
        "--out", default=".prism/builtin", help="where the model is written (ship it with --out models/assets/builtin)"
    )
    train.add_argument("--recipe", choices=list(RECIPES), default="cpu", help="steps and batch sizes per stage")
    train.add_argument("--images", type=positive(int), help="training phantoms (default: the recipe's)")
    train.add_argument(
        "--scale", type=positive(float), default=1.0, help="multiply every stage's step count (quick checks)"
    )
    train.add_argument("--batch", type=positive(int), help="one batch size for every stage (quick checks)")
    train.add_argument("--threads", type=positive(int), default=2, help="torch threads on the CPU")
    train.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    train.add_argument("--workers", type=positive(int), help="processes rendering phantoms (default: one per core)")
    train.set_defaults(func=train_builtin, log_level=logging.INFO)

    tune = sub.add_parser("finetune", help="fine-tune a local SD model on X-rays and labels (PRISM's Algorithm 1)")
    tune.add_argument("--base", required=True, help="local diffusers SD directory to start from (nothing downloads)")
    tune.add_argument("--images", required=True, help="image folder (PNG, JPEG, DICOM)")
    tune.add_argument(
        "--labels", required=True, help="CSV: Path + the 14 CheXpert conditions (1/0/-1/blank), or Path + caption"
    )
    tune.add_argument("--work", default=".prism/finetune", help="checkpoints and finetune.log (run again to resume)")
    tune.add_argument("--out", default=".prism/finetune/out", help="where unet.safetensors is written")
    tune.add_argument("--full-model", action="store_true", help="also write a full model directory (out/model)")
    tune.add_argument("--device", choices=["cpu", "cuda"])
    tune.add_argument("--validate-image", help="an image edited every --validate-every steps")
    tune.add_argument("--validate-findings", help="its labels, e.g. 'Support Devices=1'")
    tune.add_argument("--validate-edit", help="the labels to change, e.g. 'Support Devices=0'")
    tune.add_argument("--clip-model", help="CLIP directory for the validation score (default: BASE/clip)")
    add_model_flags(tune.add_argument_group("training options"), FinetuneConfig)
    tune.set_defaults(func=finetune, log_level=logging.INFO)


def make_example(args: argparse.Namespace) -> int:
    from phantoms.example import write_batch_example, write_examples

    for path in [*write_examples(Path(args.directory)), *write_batch_example(Path(args.directory))]:
        print(path)
    return 0


def make_tiny(args: argparse.Namespace) -> int:
    from models.diffusion.tiny import make_tiny_model

    try:
        print(make_tiny_model(args.directory, seed=args.seed))
    except OSError as exc:
        raise CliError(None, f"{args.directory}: {exc.strerror or exc}") from exc
    return 0


def train_builtin(args: argparse.Namespace) -> int:
    import torch

    from models.training.stopping import StopSwitch
    from phantoms.training.builtin import train_builtin as train

    torch.set_num_threads(args.threads)
    recipe = RECIPES[args.recipe]
    if args.scale != 1.0 or args.batch is not None:
        recipe = recipe.scaled(args.scale, args.batch)
    if args.images is not None:
        try:
            recipe = replace(recipe, images=args.images)
        except ValueError as exc:
            raise CliError("--images", str(exc)) from exc
    stop = StopSwitch()
    stop.handle_signals()
    try:
        train(Path(args.work), Path(args.out), recipe, device=args.device, workers=args.workers, stop=stop)
    except KeyboardInterrupt:
        print(f"prism train-builtin: stopped; checkpoints in {args.work}, run again to resume", file=sys.stderr)
        return 130
    return 0


def finetune(args: argparse.Namespace) -> int:
    from models.diffusion.components import default_device, load_bundle
    from models.imaging.files import read_image_file
    from models.request.errors import ImageError, InvalidInput, ModelLoadError
    from models.request.resolve import EditRequest, resolve
    from models.training.finetune import Finetuner, read_examples, validation_edit

    try:
        config = model_from_args(FinetuneConfig, args)
        examples = read_examples(Path(args.images), Path(args.labels))
        device = args.device or default_device()
        run = Finetuner(Path(args.base), examples, Path(args.work), config, device)
        validate = None
        if config.validate_every and args.validate_image:
            edit = resolve(EditRequest(findings=args.validate_findings, edit=args.validate_edit))
            bundle = load_bundle(args.base, clip_dir=args.clip_model, device=device)
            image = read_image_file(Path(args.validate_image), "--validate-image")
            validate = validation_edit(bundle, image, edit, Path(args.work) / "validation")
    except (ValueError, ImageError, InvalidInput, ModelLoadError, OSError) as exc:
        raise CliError(None, str(exc)) from exc
    run.stop.handle_signals()
    try:
        losses = run.run(validate)
    except KeyboardInterrupt:
        print(
            f"prism finetune: stopped at step {run.step}; checkpoint in {args.work}, run again to resume",
            file=sys.stderr,
        )
        return 130
    except InvalidInput as exc:
        raise CliError(None, f"{exc}; checkpoint at step {run.step} in {args.work}") from exc
    out = run.export(Path(args.out), args.full_model)
    print(json.dumps({"out": str(out), "steps": run.step, "first_loss": losses[0], "last_loss": losses[-1]}))
    return 0
