"""Trust anchors: the order of sources, keys named by fingerprint, and keys beside a package refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lathe.audit.trust import add_to_keyring, remove_from_keyring, resolve_trust
from lathe.errors import LatheError
from lathe.ship.signing import key_fingerprint
from tests.packages import make_keys


@pytest.fixture
def two_keys(tmp_path) -> tuple[Path, Path]:
    return make_keys(tmp_path / "a", "a")["pub"], make_keys(tmp_path / "b", "b")["pub"]


def test_the_first_given_source_decides(tmp_path, two_keys, monkeypatch):
    a, b = two_keys
    ring = tmp_path / "ring"
    add_to_keyring(b, ring)
    monkeypatch.setenv("LATHE_KEYRING", str(ring))
    monkeypatch.setenv("LATHE_PUBLIC_KEY", str(a))
    assert [k.fingerprint for k in resolve_trust(None, public_key=b).keys] == [key_fingerprint(b)]
    trust = resolve_trust(None)
    assert trust.source.startswith("$LATHE_PUBLIC_KEY") and [k.path for k in trust.keys] == [a]
    monkeypatch.delenv("LATHE_PUBLIC_KEY")
    trust = resolve_trust(None)
    assert trust.source.startswith(f"keyring {ring}") and trust.keys[0].fingerprint == key_fingerprint(b)


def test_an_explicit_source_that_fails_does_not_fall_through(tmp_path, two_keys, monkeypatch):
    a, _ = two_keys
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    add_to_keyring(a, repo / ".lathe" / "trusted-keys")
    monkeypatch.chdir(repo)
    assert len(resolve_trust(None).keys) == 1  # the repository keyring
    trust = resolve_trust(None, public_key=tmp_path / "missing.pub")
    assert trust.keys == [] and "not found" in trust.problems[0]


def test_keys_inside_or_beside_the_package_are_refused(tmp_path, two_keys):
    a, _ = two_keys
    pkg = tmp_path / "drop" / "edge"
    pkg.mkdir(parents=True)
    inside = pkg / "k.pub"
    inside.write_bytes(a.read_bytes())
    trust = resolve_trust(pkg, public_key=inside)
    assert trust.keys == [] and "inside" in trust.problems[0]
    ring = tmp_path / "drop" / ".lathe" / "trusted-keys"
    add_to_keyring(a, ring)
    trust = resolve_trust(pkg, keyring=ring)
    assert trust.keys == [] and "refused keyring" in trust.problems[0] and "beside the package" in trust.problems[0]
    assert resolve_trust(tmp_path / "elsewhere" / "edge", keyring=ring).keys  # fine for a package elsewhere


def test_keyring_add_is_idempotent_and_remove_needs_a_real_prefix(tmp_path, two_keys):
    a, b = two_keys
    ring = tmp_path / "ring"
    k1, k2 = add_to_keyring(a, ring), add_to_keyring(a, ring)
    assert k1 == k2 and k1.path.name == f"{k1.fingerprint[:16]}.pub"
    add_to_keyring(b, ring)
    assert len(resolve_trust(None, keyring=ring).keys) == 2
    with pytest.raises(LatheError, match="too short"):
        remove_from_keyring("ab", ring)
    with pytest.raises(LatheError, match="no key with fingerprint"):
        remove_from_keyring("00000000", ring)
    assert [k.fingerprint for k in remove_from_keyring(f"sha256:{k1.fingerprint[:10]}", ring)] == [k1.fingerprint]
    assert [k.fingerprint for k in resolve_trust(None, keyring=ring).keys] == [key_fingerprint(b)]


def test_unreadable_keys_in_a_keyring_are_reported_not_fatal(tmp_path, two_keys):
    a, _ = two_keys
    ring = tmp_path / "ring"
    add_to_keyring(a, ring)
    (ring / "junk.pub").write_text("not a key")
    trust = resolve_trust(None, keyring=ring)
    assert len(trust.keys) == 1 and any("junk.pub" in p for p in trust.problems)
