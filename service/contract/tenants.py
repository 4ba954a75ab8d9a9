"""Tenants: API keys, stored only as SHA-256 hashes in ``PRISM_API_KEYS_FILE``, and each tenant's
webhook signing secret. Read by the API (who is calling) and the webhook sender (how to sign).

File format, one tenant per line: ``name:sha256(key):whsec_secret`` (lines of older files,
``name:sha256(key)``, have no webhook secret). ``prism keys add NAME`` appends a line and prints
the new key and secret once; the key itself is never stored. Keys compare in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

ANONYMOUS = "anonymous"
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Tenant:
    name: str
    key_hash: str
    webhook_secret: str | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def read_tenants(path: Path) -> list[Tenant]:
    tenants = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, rest = line.partition(":")
            digest, _, secret = rest.partition(":")
            tenants.append(Tenant(name, digest, secret or None))
    return tenants


def add_tenant(path: Path, name: str) -> tuple[str, str]:
    """Create a key and a webhook secret for tenant ``name``; store the key's hash and the secret."""
    if not NAME.match(name):
        raise ValueError("key name: 1-64 letters, digits, '_', '.', '-'")
    if path.exists() and any(t.name == name for t in read_tenants(path)):
        raise ValueError(f"a key named {name!r} exists already")
    key, secret = secrets.token_urlsafe(32), new_webhook_secret()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{name}:{hash_key(key)}:{secret}\n")
    return key, secret


def tenant_for(key: str | None, tenants: list[Tenant]) -> str | None:
    """The tenant owning ``key``; every entry is compared, so timing does not reveal which matched."""
    if not key:
        return None
    digest = hash_key(key)
    found = None
    for tenant in tenants:
        if hmac.compare_digest(digest, tenant.key_hash):
            found = tenant.name
    return found


class TenantFile:
    """The keys file, re-read when it changes, so new keys work without a restart.

    A change is a new modification time, size or inode: the kernel stamps writes by a clock that
    ticks every few milliseconds, so a key appended (the size grows) or a file replaced (a new
    inode) in the same tick as the last read is still seen.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._version: tuple[int, int, int] | None = None
        self._tenants: list[Tenant] = []

    def tenants(self) -> list[Tenant]:
        if self.path is None or not self.path.exists():
            return []
        stat = self.path.stat()
        version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if version != self._version:
            self._tenants, self._version = read_tenants(self.path), version
        return self._tenants

    def webhook_secret(self, name: str) -> str | None:
        return next((t.webhook_secret for t in self.tenants() if t.name == name), None)


def signing_secret(tenants: TenantFile, owner: str, configured: str | None) -> str | None:
    """The secret webhooks of ``owner`` are signed with: its key's own, else the configured one
    (the only one when API keys are off)."""
    return tenants.webhook_secret(owner) or configured
