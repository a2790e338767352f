"""Key generation, package signing and signature verification (model-signing, offline)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from lathe.errors import LatheError
from lathe.ship.signing import SIGNATURE_FILE, generate_keys, sign_package, verify_signature


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    generate_keys(root / "a.pem", root / "a.pub")
    generate_keys(root / "b.pem", root / "b.pub")
    return {"priv": root / "a.pem", "pub": root / "a.pub", "other_pub": root / "b.pub", "other_priv": root / "b.pem"}


def make_pkg(root: Path, keys: dict[str, Path]) -> Path:
    pkg = root / "pkg"
    pkg.mkdir()
    (pkg / "model.onnx").write_bytes(b"\x08\x07model")
    (pkg / "manifest.json").write_text('{"a": 1}\n')
    sign_package(pkg, keys["priv"])
    return pkg


def test_generate_keys_private_mode_0600_and_pem(tmp_path):
    generate_keys(tmp_path / "k" / "p.pem", tmp_path / "k" / "p.pub")
    assert stat.S_IMODE((tmp_path / "k" / "p.pem").stat().st_mode) == 0o600
    assert (tmp_path / "k" / "p.pem").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "k" / "p.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_generate_keys_refuses_overwrite_unless_force(tmp_path):
    priv, pub = tmp_path / "p.pem", tmp_path / "p.pub"
    generate_keys(priv, pub)
    before = priv.read_bytes()
    with pytest.raises(LatheError, match="refusing to overwrite"):
        generate_keys(priv, pub)
    assert priv.read_bytes() == before
    generate_keys(priv, pub, force=True)
    assert priv.read_bytes() != before


def test_sign_and_verify_roundtrip(tmp_path, keys):
    pkg = make_pkg(tmp_path, keys)
    assert (pkg / SIGNATURE_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no temp file left behind
    verify_signature(pkg, keys["pub"])


def test_verify_names_changed_file(tmp_path, keys):
    pkg = make_pkg(tmp_path, keys)
    (pkg / "manifest.json").write_text('{"a": 2}\n')
    with pytest.raises(LatheError, match=r"hash mismatch.*manifest\.json"):
        verify_signature(pkg, keys["pub"])


def test_verify_names_added_and_removed_files(tmp_path, keys):
    pkg = make_pkg(tmp_path, keys)
    (pkg / ".gitignore").write_text("x")  # git helper files are hashed too
    (pkg / "model.onnx").unlink()
    with pytest.raises(LatheError, match=r"added since signing: \.gitignore.*removed since signing: model\.onnx"):
        verify_signature(pkg, keys["pub"])


def test_verify_wrong_key(tmp_path, keys):
    pkg = make_pkg(tmp_path, keys)
    with pytest.raises(LatheError, match="not made by the key"):
        verify_signature(pkg, keys["other_pub"])


def test_verify_missing_and_garbage_signature(tmp_path, keys):
    pkg = make_pkg(tmp_path, keys)
    (pkg / SIGNATURE_FILE).write_text("not a bundle")
    with pytest.raises(LatheError, match="unreadable|not made by"):
        verify_signature(pkg, keys["pub"])
    (pkg / SIGNATURE_FILE).unlink()
    with pytest.raises(LatheError, match="no signature file"):
        verify_signature(pkg, keys["pub"])


def test_sign_without_key_says_how_to_make_one(tmp_path):
    (tmp_path / "pkg").mkdir()
    with pytest.raises(LatheError, match="lathe keys init"):
        sign_package(tmp_path / "pkg", tmp_path / "missing.pem")
