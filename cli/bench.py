"""Measuring models: ``bench-phantom`` (edits against true counterfactuals), ``evaluate`` (the papers'
metrics over a folder), ``bench-speed`` (time per phase and inversion mode) and ``bench-batch``
(a batch through a private stack)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import get_args

from cli.edit import ALIASES
from cli.errors import CliError
from cli.options import add_model_flags, model_from_args, positive
from models.request.params import DtypeName, EditOptions, EditParams, InversionMode, NullTextSettings


def register(sub: argparse._SubParsersAction) -> None:
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
    speed.add_argument(
        "--modes", type=_modes, default=get_args(InversionMode), help="inversion modes, comma-separated (default: all)"
    )
    add_model_flags(speed.add_argument_group("edit options (as in the API)"), EditOptions, ALIASES)
    speed.set_defaults(func=bench_speed, log_level=logging.INFO)

    profile = sub.add_parser(
        "bench-profile", help="a torch.profiler trace and summary of null-text inner steps (where their time goes)"
    )
    _add_bench_model(profile)
    profile.add_argument("--inner-steps", type=positive(int), default=3, help="inner steps profiled (default 3)")
    profile.add_argument("--out", default="profile-out", help="directory for profile.md and trace.json")
    profile.set_defaults(func=bench_profile, log_level=logging.INFO)

    precision = sub.add_parser(
        "bench-precision", help="one job in several UNet precisions on the same input: how far the results move"
    )
    _add_bench_model(precision, dtype=False)
    precision.add_argument(
        "--dtypes", type=_dtypes, default=("float32", "float16"), help="comma-separated (default float32,float16)"
    )
    precision.add_argument("--out", default="precision-out", help="directory for precision.json and precision.md")
    precision.add_argument(
        "--inner-steps", type=int, default=NullTextSettings().inner_steps, help="null-text inner steps"
    )
    add_model_flags(precision.add_argument_group("edit options (as in the API)"), EditOptions, ALIASES)
    precision.set_defaults(func=bench_precision, log_level=logging.INFO)
    register_batch(sub)
    register_throughput(sub)


def _add_bench_model(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """--model, --device (and --dtype) as the timing commands take them."""
    parser.add_argument(
        "--model", default="builtin", help="builtin; full-size (SD v1.5's architecture, random weights); or a directory"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"])
    if dtype:
        parser.add_argument("--dtype", choices=get_args(DtypeName), help="the UNet's precision")


def _listed(choices: tuple[str, ...]):
    """An argparse ``type``: comma-separated values out of ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(text.split(","))
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"must be some of {', '.join(choices)}, got {text!r}")
        return values

    return parse


_modes = _listed(get_args(InversionMode))
_dtypes = _listed(get_args(DtypeName))


def _params(args: argparse.Namespace) -> EditParams:
    """The edit options given as flags, with the null-text inner steps."""
    try:
        options = model_from_args(EditOptions, args)
        null_text = model_from_args(NullTextSettings, args)
    except ValueError as exc:
        raise CliError(None, str(exc)) from None
    return EditParams(**options.model_dump(), null_text=null_text)


def bench_phantom(args: argparse.Namespace) -> int:
    from models.diffusion.components import load_bundle
    from models.request.errors import ModelLoadError
    from models.scoring.classifier import FindingClassifier
    from models.weights.builtin import builtin_model_dir
    from phantoms.bench import METHOD_VARIANTS, case_indices, method_variants, run_benchmark, varied

    params = _params(args)
    variants = {"default": params}
    if args.methods and args.vary:
        raise CliError(None, "give --methods or --vary, not both")
    if args.methods:
        methods = args.methods.split(",")
        unknown = sorted(set(methods) - set(METHOD_VARIANTS))
        if unknown:
            raise CliError("--methods", f"unknown {unknown}; choose from {list(METHOD_VARIANTS)}")
        variants = method_variants(params, methods)
    if args.vary:
        try:
            variants = varied(params, args.vary)
        except ValueError as exc:
            raise CliError(None, str(exc)) from exc
    model_dir = Path(args.model) if args.model else builtin_model_dir()
    if args.record_in_card and (args.methods or args.vary):
        raise CliError(None, "--record-in-card records the default variant: drop --methods and --vary")
    if args.record_in_card and args.split != "test":
        raise CliError(None, "--record-in-card records the test split: drop --split")
    try:
        case_indices(args.n, args.split)
    except ValueError as exc:
        raise CliError("--n", str(exc)) from exc
    if args.record_in_card and not (model_dir / "training.json").exists():
        raise CliError("--record-in-card", f"{model_dir} has no training.json (not a trained model)")
    try:
        bundle = load_bundle(model_dir, device=args.device)
        classifier = FindingClassifier.load(model_dir / "classifier.safetensors")
    except (ModelLoadError, OSError) as exc:
        raise CliError("--model", str(exc)) from exc
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
        raise CliError(None, str(exc)) from exc
    out = Path(args.out or args.folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(evaluation.model_dump_json(indent=2))
    (out / "evaluation.md").write_text(markdown(evaluation))
    print(markdown(evaluation))
    return 0


def _bench_model(args: argparse.Namespace):
    """The model ``--model`` names (builtin, full-size or a directory) on ``--device`` in ``--dtype``."""
    from models.diffusion.components import load_bundle
    from models.diffusion.tiny import full_size_bundle
    from models.request.errors import ModelLoadError

    try:
        if args.model == "full-size":
            return full_size_bundle(args.device or "cuda", args.dtype)
        return load_bundle(None if args.model == "builtin" else args.model, device=args.device, dtype=args.dtype)
    except (ModelLoadError, OSError) as exc:
        raise CliError("--model", str(exc)) from exc


def _bench_case(args: argparse.Namespace, resolution: int, index: int):
    """Image ``index`` and its source prompt, an edit and a second edit: a held-out phantom and its
    captions for the built-in model, else a smooth test image and device prompts."""
    from models.evaluation.speed import smooth_image
    from models.imaging.files import DecodedImage
    from phantoms.bench import bench_case
    from phantoms.captions import explicit_caption
    from phantoms.render import render

    if args.model == "builtin":
        anatomy, source, target, _ = bench_case("remove_devices", index, resolution)
        prompts = (explicit_caption(source), explicit_caption(target), explicit_caption(source.toggled("cardiomegaly")))
        return DecodedImage(render(anatomy, source), 16), prompts
    prompts = (
        "chest x-ray of a patient with support devices",
        "chest x-ray of a patient without support devices",
        "chest x-ray of a patient with pleural effusion",
    )
    return smooth_image(resolution, seed=index), prompts


def bench_speed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models.evaluation.speed import bench_speed as measure

    params = _params(args)
    bundle = _bench_model(args)
    image, prompts = _bench_case(args, bundle.resolution, 0)
    with tqdm(total=len(args.modes) * 2 * (args.repeats + 1), desc="bench-speed") as bar:
        report = measure(bundle, image, prompts, params, args.repeats, args.modes, progress=lambda _: bar.update())
    _write_report(Path(args.out), "results", report)
    return 0


def bench_profile(args: argparse.Namespace) -> int:
    from models.evaluation.speed import profile_null_text

    bundle = _bench_model(args)
    image, (source, _, _) = _bench_case(args, bundle.resolution, 0)
    out = Path(args.out)
    summary = profile_null_text(bundle, image, source, args.inner_steps, out)
    (out / "profile.md").write_text(summary)
    print(summary)
    return 0


def bench_precision(args: argparse.Namespace) -> int:
    from argparse import Namespace

    from tqdm import tqdm

    from models.evaluation.speed import compare_precisions

    params = _params(args)
    loaded = {args.dtypes[0]: _bench_model(Namespace(**{**vars(args), "dtype": args.dtypes[0]}))}
    image, (source, edit, _) = _bench_case(args, loaded[args.dtypes[0]].resolution, 0)
    with tqdm(total=len(args.dtypes), desc="bench-precision") as bar:
        report = compare_precisions(
            lambda dtype: loaded.pop(dtype, None) or _bench_model(Namespace(**{**vars(args), "dtype": dtype})),
            args.dtypes,
            image,
            (source, edit),
            params,
            progress=lambda _: bar.update(),
        )
    _write_report(Path(args.out), "precision", report)
    return 0


def _write_report(out: Path, stem: str, report) -> None:
    """A timing report as ``out/stem.json`` and ``out/stem.md``, and its table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(report.model_dump_json(indent=2))
    (out / f"{stem}.md").write_text(report.markdown())
    print(report.markdown())


def register_batch(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser(
        "bench-batch", help="a batch of phantoms through a private stack: items per minute, API memory while streaming"
    )
    batch.add_argument("--items", type=positive(int), default=200)
    batch.add_argument("--workers", type=positive(int), default=2)
    batch.add_argument(
        "--size", type=_size, help="HEIGHTxWIDTH: each phantom resized to it, with noise (real studies: 2000x2500)"
    )
    batch.add_argument("--out", default="docs/bench/batch", help="directory for results.json and results.md")
    add_model_flags(batch.add_argument_group("edit options (as in the API)"), EditOptions, ALIASES)
    batch.set_defaults(func=bench_batch, log_level=logging.INFO, inversion="negative_prompt")


class _RssSampler:
    """The resident memory of process ``pid``, sampled every 20 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.samples, self.done = pid, [_rss_kib(pid)], threading.Event()
        self.thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            self.samples.append(_rss_kib(self.pid))

    def __enter__(self) -> _RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def _size(text: str) -> tuple[int, int]:
    """An argparse ``type``: HEIGHTxWIDTH, both above 0."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be HEIGHTxWIDTH, e.g. 2000x2500, got {text!r}") from None
    if min(height, width) < 1:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return height, width


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench_batch(args: argparse.Namespace) -> int:
    """Redis, ``--workers`` workers and the API as ``prism up`` starts them with a blob store of
    their own, one batch of ``--items`` phantoms (each row's edit toggles its support devices, so
    none is skipped; ``--size`` makes them study-sized), then its dataset streamed. The API's
    resident memory is sampled while the batch is uploaded and while the dataset streams, and
    Redis's own peak is read at the end."""
    import csv
    import io
    import json
    import os
    import subprocess
    import sys
    import tempfile
    import time

    import httpx
    from redis import Redis
    from tqdm import tqdm

    from cli.local_redis import LocalRedis, free_port
    from phantoms.example import phantom_batch
    from service.client import PrismClient

    options = model_from_args(EditOptions, args).model_dump(exclude_unset=True)
    archive, _, rows = phantom_batch(args.items, size=args.size)
    table = io.StringIO()
    writer = csv.DictWriter(table, [*rows[0], "edit"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "edit": f"Support Devices={1 - r['Support Devices']}"} for r in rows)
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp) / "redis") as redis:
        port = free_port()
        env = {
            **os.environ,
            "PRISM_REDIS_URL": redis.url,
            "PRISM_BLOB_URL": (Path(tmp) / "blobs").as_uri(),
            "PRISM_BATCH_MAX_UPLOAD_BYTES": str(max(len(archive) + (1 << 20), 1 << 30)),
            "PRISM_AUTH": "off",
            "PRISM_INVERSION_CACHE_DIR": "",
            "PRISM_CPU_THREADS": str(max(1, (os.cpu_count() or 1) // args.workers)),
        }
        prism = [sys.executable, "-m", "cli"]
        log = (Path(tmp) / "stack.log").open("wb")
        children = [subprocess.Popen([*prism, "worker"], env=env, stdout=log, stderr=log) for _ in range(args.workers)]
        api = subprocess.Popen([*prism, "serve", "--port", str(port)], env=env, stdout=log, stderr=log)
        children.append(api)
        url = f"http://127.0.0.1:{port}"
        try:
            with PrismClient(url, timeout=600) as client:
                while True:
                    try:
                        if httpx.get(f"{url}/readyz").json().get("workers", 0) >= args.workers:
                            break
                    except (httpx.HTTPError, ValueError):
                        pass
                    time.sleep(0.5)
                redis_before = Redis.from_url(redis.url).info("memory")["used_memory"]
                start = time.monotonic()
                with _RssSampler(api.pid) as upload:
                    batch_id = client.submit_batch(archive, table.getvalue().encode(), **options).id
                submitted_s = time.monotonic() - start
                with tqdm(total=args.items, desc="bench-batch") as bar:
                    status = client.wait_batch(batch_id, on_progress=lambda s: bar.update(s["ended"] - bar.n))
                run_s = time.monotonic() - start
                memory = Redis.from_url(redis.url).info("memory")
                stream_start = time.monotonic()
                with _RssSampler(api.pid) as streaming:
                    dataset = client.download_dataset(batch_id, Path(tmp) / "dataset.zip")
                stream_s = time.monotonic() - stream_start
                blob_mib = sum(f.stat().st_size for f in (Path(tmp) / "blobs").rglob("*") if f.is_file()) / 2**20
        finally:
            for child in children:
                child.terminate()
            for child in children:
                child.wait(60)
        zip_mib = dataset.stat().st_size / 2**20
    result = {
        "items": args.items,
        "workers": args.workers,
        "options": options,
        "cpu_count": os.cpu_count(),
        "counts": status["counts"],
        "submit_s": round(submitted_s, 2),
        "run_s": round(run_s, 1),
        "items_per_minute": round(60 * args.items / run_s, 2),
        "size": "x".join(map(str, args.size)) if args.size else "phantom (128x128)",
        "upload_mib": round(len(archive) / 2**20, 1),
        "dataset_mib": round(zip_mib, 1),
        "blob_store_mib": round(blob_mib, 1),
        "stream_s": round(stream_s, 2),
        "api_rss_before_upload_mib": round(upload.samples[0] / 1024, 1),
        "api_rss_peak_upload_mib": round(max(upload.samples) / 1024, 1),
        "api_rss_before_stream_mib": round(streaming.samples[0] / 1024, 1),
        "api_rss_peak_stream_mib": round(max(streaming.samples) / 1024, 1),
        "redis_peak_mib": round(memory["used_memory_peak"] / 2**20, 1),
        "redis_per_item_kib": round((memory["used_memory"] - redis_before) / args.items / 1024, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    rows_md = "\n".join(f"| {k} | {v} |" for k, v in result.items())
    (out / "results.md").write_text(f"# prism bench-batch\n\n| measure | value |\n| --- | --- |\n{rows_md}\n")
    print(json.dumps(result))
    return 0


def register_throughput(sub: argparse._SubParsersAction) -> None:
    throughput = sub.add_parser(
        "bench-throughput", help="jobs per hour of one worker at several pack sizes, through the worker's path"
    )
    throughput.add_argument(
        "--model", default="builtin", help="builtin; full-size (SD v1.5's architecture, random weights); or a directory"
    )
    throughput.add_argument("--device", choices=["cpu", "cuda"])
    throughput.add_argument("--dtype", choices=get_args(DtypeName), help="the UNet's precision")
    throughput.add_argument(
        "--packs", type=_counts, default=(1, 2, 4, 8), help="pack sizes, comma-separated (default 1,2,4,8)"
    )
    throughput.add_argument(
        "--jobs", type=positive(int), default=8, help="jobs per pack size, each another image (default 8)"
    )
    throughput.add_argument(
        "--baseline-jobs", type=positive(int), help="run only this many of the jobs at pack 1 (default: all)"
    )
    throughput.add_argument(
        "--compile", choices=["off", "compile", "cudagraph"], default="off", help="the inversion loops' UNet"
    )
    throughput.add_argument(
        "--inner-steps", type=int, default=NullTextSettings().inner_steps, help="null-text inner steps"
    )
    throughput.add_argument("--out", default="speed-out", help="directory for throughput.json and throughput.md")
    add_model_flags(throughput.add_argument_group("edit options (as in the API)"), EditOptions, ALIASES)
    throughput.set_defaults(func=bench_throughput, log_level=logging.WARNING)


def _counts(text: str) -> tuple[int, ...]:
    """An argparse ``type``: comma-separated pack sizes above 0."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be numbers separated by commas, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return counts


def bench_throughput(args: argparse.Namespace) -> int:
    """A private redis-server and one in-process worker over ``--model``, compiled as ``--compile``
    asks, running ``--jobs`` jobs at every pack size of ``--packs``."""
    import tempfile

    from tqdm import tqdm

    from cli.local_redis import LocalRedis
    from models.diffusion.compiled import compile_loops
    from models.imaging.files import encode_png
    from models.request.resolve import ResolvedEdit
    from service.contract.settings import Settings
    from worker.throughput import measure_throughput

    params = _params(args)
    if params.method != "prism":
        raise CliError("--method", "only prism's jobs share packs")
    bundle = compile_loops(_bench_model(args), args.compile, max(args.packs))
    jobs = []
    for index in range(args.jobs):
        image, (source, edit, _) = _bench_case(args, bundle.resolution, index)
        jobs.append(
            (encode_png(image.pixels, 16), ResolvedEdit(original_prompt=source, edit_prompt=edit, params=params))
        )
    packs = sorted({1, *args.packs})
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp) / "redis") as redis:
        baseline = min(args.baseline_jobs or args.jobs, args.jobs)
        settings = Settings(redis_url=redis.url, blob_url=(Path(tmp) / "blobs").as_uri())
        with tqdm(total=(len(packs) - 1) * args.jobs + baseline, desc="bench-throughput") as bar:
            report = measure_throughput(bundle, jobs, packs, settings, bar.update, args.baseline_jobs)
    _write_report(Path(args.out), "throughput", report)
    return 0
