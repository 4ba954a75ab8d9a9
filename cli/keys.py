"""``prism keys add NAME``: create an API key (only its hash is stored) and its webhook signing secret."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    add = keys.add_parser("add", help="create an API key and a webhook secret; prints the key as the last line")
    add.add_argument("name")
    add.add_argument("--file", help="keys file (default: $PRISM_API_KEYS_FILE)")
    add.set_defaults(func=add_key)


def add_key(args: argparse.Namespace) -> int:
    from service.contract.settings import get_settings
    from service.contract.tenants import add_tenant

    path = args.file or get_settings().api_keys_file
    if not path:
        print("prism keys add: set PRISM_API_KEYS_FILE or pass --file", file=sys.stderr)
        return 2
    try:
        key, secret = add_tenant(Path(path), args.name)
    except ValueError as exc:
        print(f"prism keys add: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"prism keys add: --file: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"added key {args.name!r} to {path}; the key and its webhook signing secret are shown once.")
    print(f"webhook secret: {secret}")
    print(key)
    return 0
