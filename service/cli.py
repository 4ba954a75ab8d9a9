"""The ``prism`` command: engine tools (edit, make-tiny-model) and the service (serve, worker).

Heavy imports happen inside each command, so ``prism serve`` never loads torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models.params import OUTPUT_MODES, EditParams, NullTextSettings


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _edit(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from models.builtin import builtin_model_dir
    from models.errors import ImageError, InvalidInput, ModelLoadError
    from models.geometry import decode_image
    from models.inversion import InversionCache
    from models.loading import load_bundle
    from models.pipeline import generate_counterfactual

    params = EditParams(
        steps=args.steps,
        guidance_scale=args.guidance,
        cross_replace_steps=args.cross_replace,
        self_replace_steps=args.self_replace,
        edit_word_weight=args.edit_word_weight,
        blend_words=tuple(args.blend_words) if args.blend_words else None,
        reweight_words=tuple(args.reweight_words) if args.reweight_words else None,
        seed=args.seed,
        output=args.output,
    )
    try:
        image = decode_image(Path(args.image).read_bytes())
        model_dir = args.model or os.environ.get("PRISM_MODEL_DIR")
        if not model_dir:
            print("no --model given: using the built-in phantom model (synthetic data only)", file=sys.stderr)
            model_dir = builtin_model_dir()
        bundle = load_bundle(
            model_dir,
            unet_weights=args.unet_weights or os.environ.get("PRISM_UNET_WEIGHTS") or None,
            clip_dir=args.clip_model or os.environ.get("PRISM_CLIP_MODEL") or None,
            device=args.device,
        )
        bars: dict[str, tqdm] = {}

        def progress(phase: str, step: int, total: int) -> None:
            if phase not in bars:
                for bar in bars.values():
                    bar.close()
                bars[phase] = tqdm(total=total, desc=phase, file=sys.stderr)
            bars[phase].update(step - bars[phase].n)

        cache = InversionCache(Path(args.cache)) if args.cache else None
        result = generate_counterfactual(
            bundle, image, args.original_prompt, args.edit_prompt, params, cache=cache, callback=progress
        )
        for bar in bars.values():
            bar.close()
    except (InvalidInput, ImageError, ModelLoadError, OSError) as exc:
        print(f"prism edit: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in result.files().items():
        (out / name).write_bytes(data)
    print(json.dumps({"out": str(out), "s_clip": result.scores.s_clip, "passed": result.passed}))
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from models.tiny import make_tiny_model

    print(make_tiny_model(args.directory, seed=args.seed))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from service.settings import get_settings
    from worker.main import run_worker

    run_worker(get_settings(), burst=args.burst)
    return 0


def _up(args: argparse.Namespace) -> int:
    """Redis (unless PRISM_REDIS_URL is set), N workers and the API; all stopped on exit."""
    import signal
    import subprocess

    from service.redis_server import LocalRedis

    env = dict(os.environ)
    local = None
    if not env.get("PRISM_REDIS_URL"):
        local = LocalRedis(Path(env.get("PRISM_HOME", Path.home() / ".cache" / "prism")) / "redis").start()
        env["PRISM_REDIS_URL"] = local.url
        print(f"started redis-server at {local.url}", file=sys.stderr)
    children = [subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=env) for _ in range(args.workers)]
    api = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", args.host, "--port", str(args.port)], env=env
    )
    children.append(api)
    print(f"PRISM API docs: http://{args.host}:{args.port}/docs", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: api.terminate())
    try:
        api.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        if local:
            local.stop()
    return 0


def _train_builtin(args: argparse.Namespace) -> int:
    import logging

    import torch

    from phantoms.training import train_builtin

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    train_builtin(Path(args.work), Path(args.out), n_images=args.images, scale=args.scale)
    return 0


def _keys_add(args: argparse.Namespace) -> int:
    from service.auth import add_key
    from service.settings import get_settings

    path = args.file or get_settings().api_keys_file
    if not path:
        print("prism keys add: set PRISM_API_KEYS_FILE or pass --file", file=sys.stderr)
        return 2
    try:
        key = add_key(Path(path), args.name)
    except ValueError as exc:
        print(f"prism keys add: {exc}", file=sys.stderr)
        return 2
    print(f"added key {args.name!r} to {path}; it is shown once:")
    print(key)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from models.builtin import builtin_model_dir
    from models.loading import load_bundle
    from phantoms.bench import run_benchmark
    from phantoms.classifier import FindingClassifier

    model_dir = Path(args.model) if args.model else builtin_model_dir()
    bundle = load_bundle(model_dir, device=args.device)
    classifier = FindingClassifier.load(model_dir / "classifier.safetensors")
    params = EditParams(
        steps=args.steps, self_replace_steps=args.self_replace, null_text=NullTextSettings(inner_steps=args.inner_steps)
    )
    report = run_benchmark(bundle, classifier, args.n, Path(args.out), params)
    print((Path(args.out) / "results.md").read_text())
    return 0 if report["tasks"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="PRISM counterfactual chest X-ray generation")
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="generate a counterfactual for one image")
    edit.add_argument("--image", required=True, help="input PNG or JPEG")
    edit.add_argument("--original-prompt", required=True)
    edit.add_argument("--edit-prompt", required=True)
    edit.add_argument("--out", required=True, help="output directory")
    edit.add_argument("--model", help="diffusers SD directory (default: $PRISM_MODEL_DIR, else the built-in model)")
    edit.add_argument("--unet-weights", help="fine-tuned UNet .safetensors loaded over --model")
    edit.add_argument("--clip-model", help="CLIP directory for scoring (default: MODEL/clip)")
    edit.add_argument("--steps", type=int, default=50)
    edit.add_argument("--guidance", type=float, default=7.5)
    edit.add_argument("--self-replace", type=_floats, default=(0.4, 0.5, 0.6, 0.7, 0.8))
    edit.add_argument("--cross-replace", type=float, default=0.8)
    edit.add_argument("--edit-word-weight", type=float, default=2.0)
    edit.add_argument("--blend-words", nargs="+", help="default: the words that differ between the prompts")
    edit.add_argument("--reweight-words", nargs="+", help="default: the words the edit prompt adds")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument(
        "--output",
        choices=OUTPUT_MODES,
        default=EditParams.output,
        help="residual: input + (decoded edit - decoded reconstruction) where the latent was edited; "
        "decoded: the decoded edit (paper)",
    )
    edit.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    edit.add_argument("--cache", help="directory to cache inversions in (reused for the same image and prompt)")
    edit.set_defaults(func=_edit)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight model with the SD v1.5 structure")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny)

    train = sub.add_parser("train-builtin", help="train the built-in phantom model (resumable)")
    train.add_argument("--work", default=".prism/train", help="checkpoints and cached data")
    train.add_argument("--out", default="models/assets/builtin", help="where the model is written")
    train.add_argument("--images", type=int, default=16000)
    train.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    train.add_argument("--threads", type=int, default=2)
    train.set_defaults(func=_train_builtin)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    keys_add = keys.add_parser("add", help="create an API key; prints it as the last line")
    keys_add.add_argument("name")
    keys_add.add_argument("--file", help="keys file (default: $PRISM_API_KEYS_FILE)")
    keys_add.set_defaults(func=_keys_add)

    bench = sub.add_parser("bench-phantom", help="measure edits against true counterfactuals on held-out phantoms")
    bench.add_argument("--n", type=int, default=50, help="phantoms per task")
    bench.add_argument("--out", default="bench-out")
    bench.add_argument("--model", help="model directory with classifier.safetensors (default: built-in)")
    bench.add_argument("--steps", type=int, default=50)
    bench.add_argument("--inner-steps", type=int, default=10, help="null-text inner steps")
    bench.add_argument("--self-replace", type=_floats, default=(0.4, 0.5, 0.6, 0.7, 0.8))
    bench.add_argument("--device", choices=["cpu", "cuda"])
    bench.set_defaults(func=_bench)

    serve = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="run a worker: load the model once, then serve jobs")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=_worker)

    up = sub.add_parser("up", help="start redis (if PRISM_REDIS_URL is unset), workers and the API")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--workers", type=int, default=1)
    up.set_defaults(func=_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
