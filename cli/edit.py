"""``prism edit``: one counterfactual with the engine, written as the API's result files (``--outputs``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from cli.errors import CliError
from cli.options import add_model_flags, model_from_args
from models.request.params import DtypeName, EditOptions

ALIASES = {
    "guidance_scale": ["--guidance"],
    "cross_replace_steps": ["--cross-replace"],
    "self_replace_steps": ["--self-replace"],
}


def register(sub: argparse._SubParsersAction) -> None:
    edit = sub.add_parser("edit", help="generate a counterfactual for one image")
    edit.add_argument("--image", required=True, help="input PNG, JPEG or DICOM")
    edit.add_argument("--original-prompt", help="what the image shows (or give --findings and --edit)")
    edit.add_argument("--edit-prompt", help="what the counterfactual should show")
    edit.add_argument(
        "--findings", help="the image's CheXpert labels: JSON, or pairs such as 'Support Devices=1; Edema=0'"
    )
    edit.add_argument("--edit", help="with --findings: the labels to change, e.g. 'Support Devices=0'")
    edit.add_argument("--out", required=True, help="output directory")
    edit.add_argument("--model", help="diffusers SD directory (default: $PRISM_MODEL_DIR, else the built-in model)")
    edit.add_argument("--unet-weights", help="fine-tuned UNet .safetensors loaded over --model")
    edit.add_argument("--clip-model", help="CLIP directory for scoring (default: MODEL/clip)")
    edit.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    edit.add_argument(
        "--dtype", choices=get_args(DtypeName), help="the UNet's precision (default: float16 on CUDA, float32 on CPU)"
    )
    edit.add_argument("--mask", help="guided: anatomy mask image of the input's size (non-black = keep)")
    edit.add_argument(
        "--classifier", help="guided: classifier .safetensors with its .json (default: $PRISM_CLASSIFIER, the model's)"
    )
    edit.add_argument("--cache", help="directory to cache inversions in (reused for the same image and prompt)")
    add_model_flags(edit.add_argument_group("edit options (as in the API)"), EditOptions, ALIASES)
    edit.set_defaults(func=run)


def progress_bars():
    """A progress callback drawing one tqdm bar per phase on stderr, and a function closing them."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(phase: str, step: int, total: int) -> None:
        if phase not in bars:
            for bar in bars.values():
                bar.close()
            bars[phase] = tqdm(total=total, desc=phase, file=sys.stderr)
        bars[phase].update(step - bars[phase].n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return progress, close


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from models.imaging.files import keep_mask, read_image_file
    from models.request.errors import ImageError, InvalidInput, ModelLoadError
    from models.request.resolve import EditRequest, resolve
    from models.weights.layout import locate_model
    from service.contract.settings import get_settings

    flags = {
        "model_dir": args.model,
        "unet_weights": args.unet_weights,
        "clip_model": args.clip_model,
        "device": args.device,
        "dtype": args.dtype,
        "classifier": args.classifier,
    }
    settings = get_settings().model_copy(update={name: value for name, value in flags.items() if value is not None})
    try:
        options = model_from_args(EditOptions, args).model_dump()
        request = EditRequest(
            **options,
            original_prompt=args.original_prompt,
            edit_prompt=args.edit_prompt,
            findings=args.findings,
            edit=args.edit,
        )
        edit = resolve(request, with_mask=bool(args.mask))
        image = read_image_file(Path(args.image), "--image", settings.max_image_pixels)
        keep = None
        if args.mask:
            keep = keep_mask(read_image_file(Path(args.mask), "--mask", settings.max_image_pixels, accept_colour=True))
        locate_model(settings.model_dir, settings.clip_model)
        from models.diffusion.inversion import InversionCache  # the engine: once the inputs and files are known
        from models.pipeline import generate_counterfactual
        from worker.loading import bundle_from_settings, classifier_from_settings

        bundle = bundle_from_settings(settings)
        classifier = classifier_from_settings(settings) if edit.params.method == "guided" else None
        progress, close = progress_bars()
        cache = InversionCache(Path(args.cache)) if args.cache else None
        result = generate_counterfactual(
            bundle, image, edit, cache=cache, callback=progress, keep=keep, classifier=classifier
        )
        close()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CliError("--" + str(first["loc"][0]).replace("_", "-"), first["msg"]) from None
    except (ValueError, ImageError, InvalidInput, ModelLoadError, OSError) as exc:
        raise CliError(None, str(exc)) from exc
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in result.files().items():
        (out / name).write_bytes(data)
    print(json.dumps({"out": str(out), "s_clip": result.report.s_clip, "passed": result.report.passed}))
    return 0
