"""``prism submit``: one counterfactual through a running service, with the Python client: of an
image file (``--image``), or of a study in one of the service's PACS endpoints (``--source`` and
``--study-uid``), its DICOM outputs optionally stored back (``--store-to``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from cli.edit import ALIASES
from cli.errors import CliError
from cli.options import add_model_flags, model_from_args
from models.request.params import EditOptions


def register(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser(
        "submit", help="submit an image (or a PACS study) to a running service, wait, download the results"
    )
    submit.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default: %(default)s)")
    submit.add_argument("--api-key", help="X-API-Key (default: $PRISM_API_KEY)")
    given = submit.add_mutually_exclusive_group(required=True)
    given.add_argument("--image", help="PNG, JPEG or DICOM")
    given.add_argument("--source", help="instead of --image: a PACS endpoint of the service's, with --study-uid")
    submit.add_argument("--study-uid", help="with --source: the study; its one frontal radiograph is edited")
    submit.add_argument("--series-uid", help="with --source: the series to take the radiograph from")
    submit.add_argument("--sop-uid", help="with --source: the instance itself")
    submit.add_argument(
        "--store-to", help="a PACS endpoint of the service's: store the DICOM outputs into the input's study"
    )
    submit.add_argument("--original-prompt")
    submit.add_argument("--edit-prompt")
    submit.add_argument("--findings", help="CheXpert labels: JSON, or pairs such as 'Support Devices=1; Edema=0'")
    submit.add_argument("--edit", help="with --findings: the labels to change")
    submit.add_argument("--mask", help="guided: anatomy mask image of the input's size (non-black = keep)")
    submit.add_argument("--webhook", help="URL that receives the job's events")
    submit.add_argument("--webhook-events", help="which events it receives: started,completed (default: both)")
    submit.add_argument("--out", required=True, help="directory for the result files")
    add_model_flags(submit.add_argument_group("edit options (as in the API)"), EditOptions, ALIASES)
    submit.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    from service.client import PrismClient, PrismError

    reference = {name: getattr(args, name) for name in ("source", "study_uid", "series_uid", "sop_uid")}
    if args.source is not None and args.study_uid is None:
        raise CliError("--study-uid", "--source needs the study: --study-uid")
    if args.source is None and (stray := next((k for k, v in reference.items() if v is not None), None)):
        raise CliError("--" + stray.replace("_", "-"), "goes with --source (a study by reference), not --image")
    try:
        options = model_from_args(EditOptions, args).model_dump(exclude_unset=True)
    except ValueError as exc:
        raise CliError(None, str(exc)) from exc
    api_key = args.api_key or os.environ.get("PRISM_API_KEY")
    bar = tqdm(total=1, file=sys.stderr, desc="queued")

    def progress(status: dict) -> None:
        phase, step, total = status["progress"]["phase"], status["progress"]["step"], status["progress"]["total"]
        bar.set_description(phase or status["status"])
        bar.total = max(total, 1)
        bar.n = step
        bar.refresh()

    try:
        with PrismClient(args.url, api_key=api_key) as prism:
            job = prism.submit(
                args.image,
                original_prompt=args.original_prompt,
                edit_prompt=args.edit_prompt,
                findings=args.findings,
                edit=args.edit,
                mask=args.mask,
                webhook=args.webhook,
                webhook_events=args.webhook_events,
                store_to=args.store_to,
                **reference,
                **options,
            )
            status = prism.wait(job.id, on_progress=progress)
            bar.close()
            if status["status"] != "succeeded":
                print(f"prism submit: job {job.id} {status['status']}: {status.get('error')}", file=sys.stderr)
                return 1
            prism.download_all(status, args.out)
    except (PrismError, OSError) as exc:
        raise CliError(None, str(exc)) from exc
    except httpx.HTTPError as exc:
        raise CliError("--url", f"cannot reach the service at {args.url}: {exc}") from exc
    result = status["result"]
    summary = {"id": job.id, "out": args.out, "s_clip": result["s_clip"], "passed": result["passed"]}
    if result.get("stored"):
        summary["stored"] = {k: result["stored"][k] for k in ("endpoint", "protocol")}
    print(json.dumps(summary))
    return 0
