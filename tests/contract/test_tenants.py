"""The keys file: hashes only, and changes seen without a restart, also within one clock tick."""

import os

from service.contract.tenants import TenantFile, add_tenant, hash_key, tenant_for


def _same_mtime(path, stat):
    """Give ``path`` the modification time of ``stat``, as a write in the same kernel tick would."""
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_key_appended_in_the_same_tick_is_seen(tmp_path):
    keys = tmp_path / "keys"
    alice, _ = add_tenant(keys, "alice")
    tenants = TenantFile(keys)
    assert [t.name for t in tenants.tenants()] == ["alice"]
    before = keys.stat()
    bob, bob_secret = add_tenant(keys, "bob")
    _same_mtime(keys, before)
    assert tenant_for(bob, tenants.tenants()) == "bob" and tenant_for(alice, tenants.tenants()) == "alice"
    assert tenants.webhook_secret("bob") == bob_secret
    assert bob not in keys.read_text() and hash_key(bob) in keys.read_text()


def test_a_file_replaced_in_the_same_tick_with_the_same_size_is_seen(tmp_path):
    keys = tmp_path / "keys"
    add_tenant(keys, "alice")
    tenants = TenantFile(keys)
    assert [t.name for t in tenants.tenants()] == ["alice"]
    before = keys.stat()
    renamed = tmp_path / "keys.new"
    renamed.write_text(keys.read_text().replace("alice:", "carol:", 1))
    os.replace(renamed, keys)
    _same_mtime(keys, before)
    assert keys.stat().st_size == before.st_size
    assert [t.name for t in tenants.tenants()] == ["carol"]
