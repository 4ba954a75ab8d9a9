"""The ``prism`` command: the composition root. Nothing imports it.

One module per command group: ``edit`` (the engine on one image), ``submit`` (one image through a
running service), ``batch`` (a folder and its manifest, locally or through a service),
``serving`` (API, workers, all of it), ``keys`` (API keys), ``training`` (test
models, the built-in model, fine-tuning), ``bench`` (benchmarks and evaluation). Heavy imports
happen inside each command, so ``prism serve`` never loads torch. A command that cannot go on
raises :class:`~cli.errors.CliError`: one line on stderr naming the flag, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from cli import batch, bench, edit, keys, serving, submit, training
from cli.errors import CliError

GROUPS = (edit, submit, batch, serving, keys, training, bench)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(correlation_id)s %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="PRISM counterfactual chest X-ray generation")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


QUOTING_UIDS = ("highdicom", "dicomweb_client", "pynetdicom", "urllib3")


def configure_logging(level: int, json_lines: bool) -> None:
    """One handler for everything (uvicorn's loggers propagate to it): each line carries the
    request id of the HTTP request it belongs to (``-`` outside one), as text or as JSON. pydicom
    is silenced, and the DICOM libraries say warnings only."""
    from asgi_correlation_id import CorrelationIdFilter
    from pythonjsonlogger.json import JsonFormatter

    handler = logging.StreamHandler()
    handler.addFilter(CorrelationIdFilter(default_value="-"))
    handler.setFormatter(JsonFormatter(JSON_FIELDS) if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # pydicom's warnings quote attribute values, which can be patient data: never let them out.
    # (its decoders log from child loggers, which would reach the root handler unless stopped here)
    pydicom = logging.getLogger("pydicom")
    pydicom.disabled, pydicom.propagate = True, False
    for name in QUOTING_UIDS:  # their info and debug lines quote UIDs, and URLs and queries with them
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="pydicom")
    warnings.filterwarnings("ignore", module="highdicom")


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from service.contract.settings import get_settings

    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        return _refuse("prism", CliError(f"PRISM_{str(first['loc'][0]).upper()}", first["msg"]))
    configure_logging(getattr(args, "log_level", logging.WARNING), settings.log_format == "json")
    try:
        return args.func(args)
    except CliError as exc:
        command = " ".join(filter(None, (args.command, getattr(args, "keys_command", None))))
        return _refuse(f"prism {command}", exc)


def _refuse(prog: str, exc: CliError) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2
