"""Key generation, package signing and signature verification (model-signing, offline)."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from lathe.errors import LatheError
from lathe.ship.signing import (
    SIGNATURE_FILE,
    KeyFileError,
    fingerprint,
    generate_keys,
    key_fingerprint,
    public_key_pem,
    read_signature,
    sign_package,
    signature_key_hint,
    verify_signature,
)


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
    with pytest.raises(LatheError, match="^signed by another key$"):
        verify_signature(pkg, keys["other_pub"])


def test_verify_missing_and_garbage_signature(tmp_path, keys):
    pkg = make_pkg(tmp_path, keys)
    (pkg / SIGNATURE_FILE).write_bytes(b"\xff\xfe not a bundle")
    with pytest.raises(LatheError, match="not a signature bundle"):
        verify_signature(pkg, keys["pub"])
    (pkg / SIGNATURE_FILE).unlink()
    with pytest.raises(LatheError, match="missing"):
        verify_signature(pkg, keys["pub"])


def test_a_signature_edited_without_changing_its_meaning_is_refused(tmp_path, keys):
    """A signer writes compact JSON; added whitespace means the file was edited by hand."""
    pkg = make_pkg(tmp_path, keys)
    text = (pkg / SIGNATURE_FILE).read_text()
    (pkg / SIGNATURE_FILE).write_text(text.replace(",", ", ", 1))
    with pytest.raises(LatheError, match="canonical form"):
        verify_signature(pkg, keys["pub"])


def test_the_signature_names_its_key_by_fingerprint(tmp_path, keys):
    pkg = make_pkg(tmp_path, keys)
    fp = key_fingerprint(keys["pub"])
    assert len(fp) == 64 and fp != key_fingerprint(keys["other_pub"])
    assert signature_key_hint(read_signature(pkg)) == fp
    assert key_fingerprint(keys["pub"]) == fingerprint(public_key_pem(keys["pub"]))


def test_a_bad_public_key_file_is_named(tmp_path, keys):
    pkg = make_pkg(tmp_path, keys)
    bad = tmp_path / "bad.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyFileError, match="bad.pub: not a PEM public key"):
        verify_signature(pkg, bad)
    with pytest.raises(KeyFileError, match="not found"):
        verify_signature(pkg, tmp_path / "none.pub")


def test_sign_without_key_says_how_to_make_one(tmp_path):
    (tmp_path / "pkg").mkdir()
    with pytest.raises(LatheError, match="lathe keys init"):
        sign_package(tmp_path / "pkg", tmp_path / "missing.pem")


def test_a_signature_whose_base64_spare_bits_were_changed_is_refused(tmp_path, keys):
    """'...Cn0=' and '...Cn1=' decode to the same bytes; only the canonical text is accepted."""
    pkg = make_pkg(tmp_path, keys)
    for _ in range(20):  # ECDSA signatures vary in length: sign until one of the fields carries padding
        text = (pkg / SIGNATURE_FILE).read_text()
        envelope = json.loads(text)["dsseEnvelope"]
        padded = [v for v in (envelope["payload"], envelope["signatures"][0]["sig"]) if v.endswith("=")]
        if padded:
            break
        sign_package(pkg, keys["priv"])
    value = padded[0]
    pad = value.index("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = next(value[:pad - 1] + c + value[pad:] for c in alphabet
                if c != value[pad - 1] and base64.b64decode(value[:pad - 1] + c + value[pad:]) == base64.b64decode(value))
    (pkg / SIGNATURE_FILE).write_text(text.replace(value, twin))
    with pytest.raises(LatheError, match="not canonical base64"):
        verify_signature(pkg, keys["pub"])
