"""The ``prism`` command: the composition root. Nothing imports it.

One module per command group: ``edit`` (the engine on one image), ``serving`` (API, worker, all
of it), ``keys`` (API keys), ``build`` (test models, the built-in model, benchmarks). Heavy
imports happen inside each command, so ``prism serve`` never loads torch.
"""

from __future__ import annotations

import argparse
import logging

from service.cli import build, edit, keys, serving

GROUPS = (edit, serving, keys, build)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="PRISM counterfactual chest X-ray generation")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", logging.WARNING), format=LOG_FORMAT)
    return args.func(args)
