"""Model building and measuring: ``make-tiny-model``, ``train-builtin``, ``bench-phantom``, ``evaluate``,
``bench-speed``."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import get_args

from cli.edit import ALIASES
from cli.options import add_model_flags, model_from_args, positive
from models.request.params import DtypeName, EditOptions, EditParams, FinetuneConfig, NullTextSettings
from phantoms.recipe import RECIPES


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

    bench = sub.add_parser("bench-phantom", help="measure edits against true counterfactuals on held-out phantoms")
    bench.add_argument("--n", type=int, default=50, help="phantoms per task")
    bench.add_argument(
        "--split",
        choices=["test", "validation"],
        default="test",
        help="test: the cases results are reported on; validation: other phantoms, to choose settings on",
    )
    bench.add_argument("--out", default="bench-out", help="results, grid, and each case's measures (to resume)")
    bench.add_argument(
        "--vary",
        metavar="OPTION=V1,V2",
        action="append",
        help="run one variant per value of an edit option on the same cases, e.g. inversion=null_text,direct; "
        "repeat for several options (a variant equal to an earlier one runs once)",
    )
    bench.add_argument(
        "--methods",
        help="comma list of methods (prism, sdedit, guided), each at its paper's settings and one tuned setting",
    )
    bench.add_argument("--inception", help="a local TorchScript Inception-v3 file, to report FID proper")
    bench.add_argument("--model", help="model directory with classifier.safetensors (default: built-in)")
    bench.add_argument("--device", choices=["cpu", "cuda"])
    bench.add_argument(
        "--record-in-card",
        action="store_true",
        help="write the default variant's goal measures into the model's training.json and MODEL_CARD.md",
    )
    bench.add_argument(
        "--inner-steps",
        type=int,
        default=NullTextSettings().inner_steps,
        help="null-text inner steps (default: %(default)s)",
    )
    add_model_flags(bench.add_argument_group("edit options (as in the API)"), EditOptions, ALIASES)
    bench.set_defaults(func=bench_phantom, log_level=logging.INFO)

    evaluation = sub.add_parser(
        "evaluate", help="the papers' metrics over a folder of input / counterfactual (/ truth) images"
    )
    evaluation.add_argument("folder", help="input/, counterfactual/, optional truth/ and cases.json (see README)")
    evaluation.add_argument("--model", help="model directory whose CLIP scores the images (default: built-in)")
    evaluation.add_argument(
        "--classifier", help="classifier .safetensors with its .json (default: the model's, if it has one)"
    )
    evaluation.add_argument("--inception", help="a local TorchScript Inception-v3 file, to report FID proper")
    evaluation.add_argument("--device", choices=["cpu", "cuda"])
    evaluation.add_argument("--out", help="directory for evaluation.json and evaluation.md (default: the folder)")
    evaluation.set_defaults(func=evaluate, log_level=logging.INFO)

    speed = sub.add_parser("bench-speed", help="time a counterfactual per phase and inversion mode, cold and cached")
    speed.add_argument(
        "--model",
        default="builtin",
        help="builtin; full-size (SD v1.5's architecture with random weights, built in memory: a GPU's job); "
        "or a model directory",
    )
    speed.add_argument("--device", choices=["cpu", "cuda"])
    speed.add_argument("--dtype", choices=get_args(DtypeName), help="the UNet's precision")
    speed.add_argument(
        "--repeats", type=positive(int), default=3, help="timed runs per row, after one warm-up (median)"
    )
    speed.add_argument("--out", default="speed-out", help="directory for results.json and results.md")
    speed.add_argument("--inner-steps", type=int, default=NullTextSettings().inner_steps, help="null-text inner steps")
    add_model_flags(speed.add_argument_group("edit options (as in the API)"), EditOptions, ALIASES)
    speed.set_defaults(func=bench_speed, log_level=logging.INFO)


def _params(args: argparse.Namespace, command: str) -> EditParams | None:
    """The edit options given as flags, with the null-text inner steps; None after printing why not."""
    try:
        options = model_from_args(EditOptions, args)
        null_text = model_from_args(NullTextSettings, args)
    except ValueError as exc:
        print(f"prism {command}: error: {exc}")
        return None
    return EditParams(**options.model_dump(), null_text=null_text)


def make_tiny(args: argparse.Namespace) -> int:
    from models.weights.tiny import make_tiny_model

    try:
        print(make_tiny_model(args.directory, seed=args.seed))
    except OSError as exc:
        print(f"prism make-tiny-model: error: {args.directory}: {exc.strerror or exc}")
        return 2
    return 0


def train_builtin(args: argparse.Namespace) -> int:
    import torch

    from models.training.stopping import StopSwitch
    from phantoms.training import train_builtin as train

    torch.set_num_threads(args.threads)
    recipe = RECIPES[args.recipe]
    if args.scale != 1.0 or args.batch is not None:
        recipe = recipe.scaled(args.scale, args.batch)
    if args.images is not None:
        try:
            recipe = replace(recipe, images=args.images)
        except ValueError as exc:
            print(f"prism train-builtin: error: --images: {exc}")
            return 2
    stop = StopSwitch()
    stop.handle_signals()
    try:
        train(Path(args.work), Path(args.out), recipe, device=args.device, workers=args.workers, stop=stop)
    except KeyboardInterrupt:
        print(f"prism train-builtin: stopped; checkpoints in {args.work}, run again to resume")
        return 130
    return 0


def finetune(args: argparse.Namespace) -> int:
    from models.diffusion.components import default_device, load_bundle
    from models.imaging.geometry import read_image_file
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
        print(f"prism finetune: error: {exc}")
        return 2
    run.stop.handle_signals()
    try:
        losses = run.run(validate)
    except KeyboardInterrupt:
        print(f"prism finetune: stopped at step {run.step}; checkpoint in {args.work}, run again to resume")
        return 130
    except InvalidInput as exc:
        print(f"prism finetune: error: {exc}; checkpoint at step {run.step} in {args.work}")
        return 2
    out = run.export(Path(args.out), args.full_model)
    print(json.dumps({"out": str(out), "steps": run.step, "first_loss": losses[0], "last_loss": losses[-1]}))
    return 0


def bench_phantom(args: argparse.Namespace) -> int:
    from models.diffusion.components import load_bundle
    from models.request.errors import ModelLoadError
    from models.scoring.classifier import FindingClassifier
    from models.weights.builtin import builtin_model_dir
    from phantoms.bench import METHOD_VARIANTS, case_indices, method_variants, run_benchmark, varied

    params = _params(args, "bench-phantom")
    if params is None:
        return 2
    variants = {"default": params}
    if args.methods and args.vary:
        print("prism bench-phantom: error: give --methods or --vary, not both")
        return 2
    if args.methods:
        methods = args.methods.split(",")
        unknown = sorted(set(methods) - set(METHOD_VARIANTS))
        if unknown:
            print(f"prism bench-phantom: error: --methods: unknown {unknown}; choose from {list(METHOD_VARIANTS)}")
            return 2
        variants = method_variants(params, methods)
    if args.vary:
        try:
            variants = varied(params, args.vary)
        except ValueError as exc:
            print(f"prism bench-phantom: error: {exc}")
            return 2
    model_dir = Path(args.model) if args.model else builtin_model_dir()
    if args.record_in_card and (args.methods or args.vary):
        print("prism bench-phantom: error: --record-in-card records the default variant: drop --methods and --vary")
        return 2
    if args.record_in_card and args.split != "test":
        print("prism bench-phantom: error: --record-in-card records the test split: drop --split")
        return 2
    try:
        case_indices(args.n, args.split)
    except ValueError as exc:
        print(f"prism bench-phantom: error: --n: {exc}")
        return 2
    if args.record_in_card and not (model_dir / "training.json").exists():
        print(f"prism bench-phantom: error: --record-in-card: {model_dir} has no training.json (not a trained model)")
        return 2
    try:
        bundle = load_bundle(model_dir, device=args.device)
        classifier = FindingClassifier.load(model_dir / "classifier.safetensors")
    except (ModelLoadError, OSError) as exc:
        print(f"prism bench-phantom: error: --model: {exc}")
        return 2
    inception = Path(args.inception) if args.inception else None
    report = run_benchmark(bundle, classifier, args.n, Path(args.out), variants, inception=inception, split=args.split)
    if args.record_in_card:
        from phantoms.model_card import record_benchmark

        record_benchmark(model_dir, report)
    print((Path(args.out) / "results.md").read_text())
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from models.diffusion.components import load_bundle
    from models.evaluation.quality import evaluate as run_evaluation
    from models.evaluation.quality import load_cases, markdown
    from models.request.errors import ImageError, InvalidInput, ModelLoadError
    from models.scoring.classifier import configured_classifier
    from models.scoring.clip import ClipScorer

    try:
        cases = load_cases(args.folder)
        bundle = load_bundle(args.model, device=args.device)
        classifier = configured_classifier(args.classifier, args.model)
        inception = Path(args.inception) if args.inception else None
        evaluation = run_evaluation(cases, ClipScorer(bundle.clip, bundle.device), classifier, inception)
    except (ImageError, InvalidInput, ModelLoadError, OSError) as exc:
        print(f"prism evaluate: error: {exc}")
        return 2
    out = Path(args.out or args.folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(evaluation.model_dump_json(indent=2))
    (out / "evaluation.md").write_text(markdown(evaluation))
    print(markdown(evaluation))
    return 0


def bench_speed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models.diffusion.components import load_bundle
    from models.evaluation.speed import bench_speed as measure
    from models.evaluation.speed import smooth_image
    from models.imaging.geometry import DecodedImage
    from models.request.errors import ModelLoadError
    from models.weights.tiny import full_size_bundle
    from phantoms.bench import bench_case
    from phantoms.captions import explicit_caption
    from phantoms.render import render

    params = _params(args, "bench-speed")
    if params is None:
        return 2
    try:
        if args.model == "full-size":
            bundle = full_size_bundle(args.device or "cuda", args.dtype)
        else:
            bundle = load_bundle(None if args.model == "builtin" else args.model, device=args.device, dtype=args.dtype)
    except (ModelLoadError, OSError) as exc:
        print(f"prism bench-speed: error: --model: {exc}")
        return 2
    if args.model == "builtin":
        anatomy, source, target, _ = bench_case("remove_devices", 0, bundle.resolution)
        image = DecodedImage(render(anatomy, source), 16)
        prompts = (explicit_caption(source), explicit_caption(target), explicit_caption(source.toggled("cardiomegaly")))
    else:
        image = smooth_image(bundle.resolution)
        prompts = (
            "chest x-ray of a patient with support devices",
            "chest x-ray of a patient without support devices",
            "chest x-ray of a patient with pleural effusion",
        )
    with tqdm(total=3 * 2 * (args.repeats + 1), desc="bench-speed") as bar:
        report = measure(bundle, image, prompts, params, args.repeats, progress=lambda _: bar.update())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(report.model_dump_json(indent=2))
    (out / "results.md").write_text(report.markdown())
    print(report.markdown())
    return 0
