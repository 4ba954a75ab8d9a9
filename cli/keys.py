"""``prism keys add NAME``: create an API key (only its hash is stored) and its webhook signing secret."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.errors import CliError


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
        raise CliError(None, "set PRISM_API_KEYS_FILE or pass --file")
    try:
        key, secret = add_tenant(Path(path), args.name)
    except ValueError as exc:
        raise CliError(None, str(exc)) from exc
    except OSError as exc:
        raise CliError("--file", f"{path}: {exc.strerror or exc}") from exc
    print(f"added key {args.name!r} to {path}; the key and its webhook signing secret are shown once.")
    print(f"webhook secret: {secret}")
    print(key)
    return 0
