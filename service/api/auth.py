"""API keys: stored only as SHA-256 hashes in ``PRISM_API_KEYS_FILE``, compared in constant time.

File format, one key per line: ``name:hexdigest``. ``prism keys add NAME`` appends a line and
prints the new key as its last line of output; the key itself is never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

ANONYMOUS = "anonymous"
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: Path) -> list[tuple[str, str]]:
    entries = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, digest = line.partition(":")
            entries.append((name, digest))
    return entries


def add_key(path: Path, name: str) -> str:
    """Create a key for tenant ``name``, store its hash, return the key."""
    if not NAME.match(name):
        raise ValueError("key name: 1-64 letters, digits, '_', '.', '-'")
    if path.exists() and any(n == name for n, _ in read_keys(path)):
        raise ValueError(f"a key named {name!r} exists already")
    key = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{name}:{hash_key(key)}\n")
    return key


def tenant_for(key: str | None, entries: list[tuple[str, str]]) -> str | None:
    """The tenant owning ``key``; every entry is compared, so timing does not reveal which matched."""
    if not key:
        return None
    digest = hash_key(key)
    found = None
    for name, stored in entries:
        if hmac.compare_digest(digest, stored):
            found = name
    return found


class KeyRing:
    """The keys file, re-read when it changes, so new keys work without a restart."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mtime: float | None = None
        self._entries: list[tuple[str, str]] = []

    def entries(self) -> list[tuple[str, str]]:
        if self.path is None or not self.path.exists():
            return []
        mtime = self.path.stat().st_mtime
        if mtime != self._mtime:
            self._entries, self._mtime = read_keys(self.path), mtime
        return self._entries
