"""``prism batch``: a folder of images and a CSV manifest to a dataset folder, through a running
service (``--url``) or with the engine in this process, with one progress bar over the set.

The output folder has the dataset ZIP's layout (:mod:`service.contract.datasets`). Its
``manifest.csv`` is rewritten after every finished item (locally) or batch (service), so a run
that is stopped and started again skips the rows already succeeded or skipped and runs the rest
(failed and canceled rows are tried again). Against a service the Idempotency-Key is the content
of what is sent, so a re-run while the first batch still runs follows that batch. Ctrl-C stops
it with one line saying so and exit status 130 (the same command resumes).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

from cli.edit import ALIASES
from cli.errors import CliError
from cli.options import add_model_flags, model_from_args
from models.request.params import EditOptions

DONE = ("succeeded", "skipped")
INTERRUPTED = 130
"""128 + SIGINT, as shells report a command stopped by Ctrl-C."""


def register(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="counterfactuals of a folder of images listed in a CSV manifest")
    batch.add_argument("--images", help="folder holding the images the manifest's Path column names")
    batch.add_argument(
        "--manifest",
        required=True,
        help="CSV: Path (or, with --source, study_uid and optionally series_uid, sop_uid), and CheXpert condition "
        "columns or original_prompt/edit_prompt",
    )
    batch.add_argument("--out", required=True, help="output folder (the dataset layout, with manifest.csv)")
    batch.add_argument("--edit", help="with condition columns: the labels to change, e.g. 'Support Devices=0'")
    batch.add_argument("--original-prompt", help="for rows without their own")
    batch.add_argument("--edit-prompt", help="for rows without their own")
    batch.add_argument("--url", help="a running service; unset: the engine in this process")
    batch.add_argument("--api-key", help="X-API-Key (default: $PRISM_API_KEY)")
    batch.add_argument(
        "--source", help="with --url, for a manifest of studies: the service's PACS endpoint they are in"
    )
    batch.add_argument("--store-to", help="with --url: a PACS endpoint of the service's to store DICOM outputs into")
    batch.add_argument("--passed-only", action="store_true", help="keep only the files of edits with S_CLIP >= 0.1")
    batch.add_argument("--model", help="local: diffusers SD directory (default: $PRISM_MODEL_DIR, else built-in)")
    batch.add_argument("--device", choices=["cpu", "cuda"], help="local: default cuda when available")
    add_model_flags(batch.add_argument_group("edit options (as in the API)"), EditOptions, ALIASES)
    batch.set_defaults(func=run)


def _plan(args: argparse.Namespace, manifest_bytes: bytes):
    """The manifest resolved here (a bad one stops before anything runs) and the rows already done."""
    from pydantic import ValidationError

    from models.request.errors import InvalidInput
    from models.request.manifest import ManifestInvalid, read_manifest
    from models.request.resolve import EditRequest
    from service.contract.datasets import MANIFEST, NotADatasetManifest, read_manifest_csv

    try:
        options = model_from_args(EditOptions, args).model_dump(exclude_unset=True)
        base = EditRequest(
            **options, edit=args.edit, original_prompt=args.original_prompt, edit_prompt=args.edit_prompt
        )
        manifest = read_manifest(manifest_bytes, base)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CliError("--" + str(first["loc"][0]).replace("_", "-"), first["msg"]) from None
    except InvalidInput as exc:
        raise CliError("--" + exc.field.replace("_", "-"), exc.message) from None
    except ManifestInvalid as exc:
        raise CliError("--manifest", str(exc)) from None
    if manifest.errors:
        lines = "; ".join(f"line {e.line} ({e.column}): {e.message}" for e in manifest.errors[:10])
        raise CliError("--manifest", f"{len(manifest.errors)} bad rows: {lines}")
    previous = Path(args.out) / MANIFEST
    try:
        kept = {line.path: line for line in read_manifest_csv(previous.read_bytes())} if previous.is_file() else {}
    except (OSError, NotADatasetManifest) as exc:
        raise CliError("--out", f"{previous} is not a manifest this command wrote ({exc}): move it away") from None
    return options, manifest, kept


def _write_manifest(out: Path, lines: dict) -> None:
    from models.atomic import write_aside
    from service.contract.datasets import MANIFEST, manifest_csv

    ordered = sorted(lines.values(), key=lambda line: line.line)
    write_aside(out / MANIFEST, lambda p: p.write_bytes(manifest_csv(ordered)))


def _summary(lines: dict, started: float, out: Path) -> dict:
    statuses = Counter(line.status for line in lines.values())
    failed = Counter(line.error_code or "unknown" for line in lines.values() if line.status == "failed")
    return {
        "n": len(lines),
        "succeeded": statuses["succeeded"],
        "passed": sum(1 for line in lines.values() if line.passed),
        "skipped": statuses["skipped"],
        "failed": dict(failed),
        "canceled": statuses["canceled"],
        "seconds": round(time.monotonic() - started, 1),
        "out": str(out),
    }


def run(args: argparse.Namespace) -> int:
    """The batch, or exit status 130 with one line on stderr when Ctrl-C stops it: the output so
    far is consistent (its manifest is rewritten whole), and the same command picks up the rest."""
    from service.contract.datasets import MANIFEST

    try:
        return _run(args)
    except KeyboardInterrupt:
        done = Path(args.out) / MANIFEST
        print(
            f"prism batch: interrupted; run the same command again to resume ({done} lists the rows done)",
            file=sys.stderr,
        )
        return INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models.request.manifest import find_file, read_rows

    started = time.monotonic()
    for flag in ("source", "store_to"):
        if getattr(args, flag) is not None and not args.url:
            raise CliError("--" + flag.replace("_", "-"), "PACS endpoints are the service's: needs --url")
    manifest_path, out = Path(args.manifest), Path(args.out)
    try:
        manifest_bytes = manifest_path.read_bytes()
    except OSError as exc:
        raise CliError("--manifest", str(exc)) from None
    options, manifest, kept = _plan(args, manifest_bytes)
    _check_image_source(args, manifest.by_reference)
    lines = {item.path: kept[item.path] for item in manifest.items if item.path in kept}
    todo = [item for item in manifest.items if lines.get(item.path) is None or lines[item.path].status not in DONE]
    files, images = {}, Path(args.images or ".")
    for item in [] if manifest.by_reference else todo:
        found = find_file(images, item.path)
        if found is None:
            raise CliError("--images", f"manifest line {item.line}: no image {item.path} under {images}")
        files[item.path] = found
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError("--out", str(exc)) from None
    bar = tqdm(total=len(manifest.items), initial=len(manifest.items) - len(todo), desc="batch", file=sys.stderr)
    try:
        if todo and args.url:
            _remote(args, options, todo, files, read_rows(manifest_bytes), lines, out, bar)
        elif todo:
            _local(args, todo, files, lines, out, bar)
    finally:
        bar.close()  # before any last line: a bar closed later would be drawn again below it
    _write_manifest(out, lines)
    print(json.dumps(_summary(lines, started, out)))
    return 0


def _check_image_source(args: argparse.Namespace, by_reference: bool) -> None:
    """A manifest of files needs ``--images``; one of studies (``study_uid``) needs ``--source``
    instead, the PACS endpoint of the service's they are in (as ``POST /batches`` says)."""
    if by_reference and not args.url:
        raise CliError("--url", "the manifest names studies (study_uid): a service reads them from its PACS")
    if by_reference and args.source is None:
        raise CliError("--source", "the manifest names studies (study_uid): give the PACS endpoint they are in")
    if by_reference and args.images is not None:
        raise CliError("--images", "the manifest names studies (study_uid), not files: leave --images out")
    if not by_reference and args.source is not None:
        raise CliError("--source", "is for a manifest of studies (study_uid); this one names files (Path)")
    if not by_reference and args.images is None:
        raise CliError("--images", "give the folder of the images the manifest's Path column names")


def _remote(args, options, todo, files, table, lines, out: Path, bar) -> None:
    """One batch of the rows still to do: the ZIP and the manifest's own rows for them (its known
    columns, each ``Path`` in the name rule's form, the name the image has in the ZIP); for a
    manifest of studies, its rows alone (the service retrieves each from ``--source``)."""
    import httpx

    from models.request.manifest import PATH, InvalidPath, clean_path
    from service.client import PrismClient, PrismError
    from service.contract.datasets import MANIFEST, NotADatasetManifest, read_manifest_csv

    zipped = None
    if by_path := PATH in table.columns:
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as z:
            for item in todo:
                z.write(files[item.path], item.path)
        zipped = archive.getvalue()
    rows = dict(table.rows)
    manifest = io.StringIO(newline="")
    writer = csv.DictWriter(manifest, list(table.columns.values()), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**rows[item.line], **({table.columns[PATH]: item.path} if by_path else {})} for item in todo)
    fields = {"edit": args.edit, "original_prompt": args.original_prompt, "edit_prompt": args.edit_prompt}
    fields |= {"source": args.source, "store_to": args.store_to}
    sent = {**{k: v for k, v in fields.items() if v is not None}, **options}
    key = hashlib.sha256((zipped or b"") + manifest.getvalue().encode() + json.dumps(sent, sort_keys=True).encode())
    original_line = {item.path: item.line for item in todo}
    done_before = bar.n

    def progress(status: dict) -> None:
        bar.n = done_before + status["ended"]
        bar.refresh()

    try:
        with PrismClient(args.url, api_key=args.api_key or os.environ.get("PRISM_API_KEY"), timeout=600) as prism:
            submitted = prism.submit_batch(
                zipped, manifest.getvalue().encode(), idempotency_key=key.hexdigest(), **sent
            )
            prism.wait_batch(submitted.id, on_progress=progress)
            with tempfile.TemporaryDirectory(dir=out) as tmp:
                dataset = prism.download_dataset(submitted.id, Path(tmp) / "dataset.zip", args.passed_only)
                with zipfile.ZipFile(dataset) as z:
                    for info in z.infolist():
                        if info.is_dir() or info.filename == MANIFEST:
                            continue
                        target = out / clean_path(info.filename)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(z.read(info))
                    for line in read_manifest_csv(z.read(MANIFEST)):
                        if line.path in original_line:
                            lines[line.path] = line.model_copy(update={"line": original_line[line.path]})
    except PrismError as exc:
        raise CliError("--url", str(exc)) from exc
    except httpx.HTTPError as exc:
        raise CliError("--url", f"cannot reach the service at {args.url}: {exc}") from exc
    except (zipfile.BadZipFile, InvalidPath, NotADatasetManifest) as exc:
        raise CliError("--url", f"the service's dataset.zip is not one this command can unpack ({exc})") from exc


def _local(args, todo, files, lines, out: Path, bar) -> None:
    """Each row with the engine, its files and manifest line written as soon as it is done."""
    from models.imaging.files import read_image_file
    from models.request.errors import ImageError, InvalidInput, ModelLoadError
    from models.weights.layout import locate_model
    from service.contract.datasets import ManifestLine, counterfactual_name, dataset_names
    from service.contract.settings import get_settings

    flags = {"model_dir": args.model, "device": args.device}
    settings = get_settings().model_copy(update={k: v for k, v in flags.items() if v is not None})
    try:
        locate_model(settings.model_dir, settings.clip_model)
    except ModelLoadError as exc:
        raise CliError("--model", str(exc)) from None
    from models.pipeline import generate_counterfactual
    from worker.loading import bundle_from_settings, classifier_from_settings

    bundle = bundle_from_settings(settings)
    classifier = None
    for item in todo:
        line = ManifestLine(line=item.line, path=item.path, status="skipped", reason=item.skipped or "")
        if item.edit is not None:
            try:
                image = read_image_file(files[item.path], "--images", settings.max_image_pixels)
                if item.edit.params.method == "guided" and classifier is None:
                    classifier = classifier_from_settings(settings)
                result = generate_counterfactual(bundle, image, item.edit, classifier=classifier)
            except (ImageError, InvalidInput) as exc:
                line = line.model_copy(
                    update={"status": "failed", "reason": exc.message, "error_code": "invalid_image"}
                )
            else:
                report, written = result.report, result.files()
                names = dataset_names(item.path, written)
                if report.passed or not args.passed_only:
                    for name, arcname in names.items():
                        (out / arcname).parent.mkdir(parents=True, exist_ok=True)
                        (out / arcname).write_bytes(written[name])
                line = line.model_copy(
                    update={
                        "status": "succeeded",
                        "reason": "",
                        "original_prompt": report.original_prompt,
                        "edit_prompt": report.edit_prompt,
                        "s_clip": report.s_clip,
                        "passed": report.passed,
                        "chosen_self_replace": report.chosen_self_replace,
                        "counterfactual": counterfactual_name(names) if report.passed or not args.passed_only else "",
                    }
                )
        lines[item.path] = line
        _write_manifest(out, lines)
        bar.update(1)
