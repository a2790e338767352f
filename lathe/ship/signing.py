"""Package signing: a local EC P-256 key pair and OpenSSF model signing (model-signing 1.1.1), offline.

The signature file sits inside the package folder (`<pkg>/signature`) and covers every other file
of the folder as shipped (model.onnx stamped). The signature file itself is excluded from the
hashed set; git helper paths (.gitignore, ...) are NOT excluded, so a stray file of any name is
caught.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lathe.errors import LatheError

SIGNATURE_FILE = "signature"
DEFAULT_PRIVATE_KEY = Path(".lathe/keys/signing-key.pem")
DEFAULT_PUBLIC_KEY = Path(".lathe/keys/signing-key.pub")


class SignatureError(LatheError):
    """A package signature is missing, made by another key, or does not match the files."""


def generate_keys(private_path: Path, public_path: Path, force: bool = False) -> None:
    """Write a new EC P-256 key pair as PEM: private (PKCS#8, unencrypted, mode 0600) and public.

    Refuses to overwrite an existing key file unless `force`; writes are atomic.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise LatheError(f"private and public key paths are the same file: {private_path}")
    existing = [p for p in (private_path, public_path) if p.exists()]
    if existing and not force:
        raise LatheError(f"refusing to overwrite existing key file(s): {', '.join(map(str, existing))} "
                         "(pass --force to replace them; packages signed with the old key will no longer verify "
                         "with the new public key)")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_atomic(private_path, private_pem, 0o600)
    _write_atomic(public_path, public_pem, 0o644)


def _write_atomic(dest: Path, data: bytes, mode: int) -> None:
    """Create the file with `mode` from the start (a private key is never world-readable, even briefly)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _hashing_config():
    from model_signing import hashing

    # ignore only the signature itself; .git* files are hashed like any other (ignore_git_paths=False)
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)


def _check_dir(pkg_dir: Path) -> Path:
    pkg_dir = Path(pkg_dir)
    if not pkg_dir.is_dir():
        raise LatheError(f"{pkg_dir}: not a package folder")
    return pkg_dir


def sign_package(pkg_dir: Path, private_key: Path) -> None:
    """Sign every file of `pkg_dir` (except `signature`) and write `pkg_dir/signature` atomically."""
    from model_signing import signing

    pkg_dir = _check_dir(pkg_dir)
    private_key = Path(private_key)
    if not private_key.is_file():
        raise LatheError(f"signing key {private_key} not found; create a key pair with `lathe keys init`")
    dest = pkg_dir / SIGNATURE_FILE
    # the temp file must not sit inside the signed folder while hashing: write it beside the folder
    tmp = pkg_dir.parent / f".{pkg_dir.name}.signature.{os.getpid()}.tmp"
    try:
        cfg = signing.Config().use_elliptic_key_signer(private_key=private_key)
        cfg.set_hashing_config(_hashing_config())
        try:
            cfg.sign(pkg_dir, tmp)
        except (ValueError, TypeError) as exc:
            raise LatheError(f"cannot sign {pkg_dir} with {private_key}: {exc}") from exc
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


# model-signing lists its diff as a repr()'d list, so quotes may arrive backslash-escaped
_MISMATCH = re.compile(r"Hash mismatch for \\*'([^'\\]+)\\*'")
_EXTRA = re.compile(r"Extra files found in model \\*'[^']*\\*': ([^\"\]]+?)(?:\\*['\"]|\]|$)")
_MISSING = re.compile(r"Missing files in model \\*'[^']*\\*': ([^\"\]]+?)(?:\\*['\"]|\]|$)")


def verify_signature(pkg_dir: Path, public_key: Path) -> None:
    """Check `pkg_dir/signature` against the files of `pkg_dir` with `public_key`.

    Raises SignatureError naming the problem: no signature, unreadable signature, signed by another
    key, or which files were added, removed or changed since signing.
    """
    from model_signing import verifying

    pkg_dir = _check_dir(pkg_dir)
    public_key = Path(public_key)
    sig = pkg_dir / SIGNATURE_FILE
    if not public_key.is_file():
        raise SignatureError(f"public key {public_key} not found")
    if not sig.is_file():
        raise SignatureError(f"{pkg_dir}: no signature file")
    cfg = verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    cfg.set_hashing_config(_hashing_config())
    try:
        cfg.verify(pkg_dir, sig)
    except ValueError as exc:
        msg = str(exc)
        if msg.startswith("Signature mismatch"):
            raise SignatureError(_describe_mismatch(msg)) from exc
        raise SignatureError(f"{sig}: signature not made by the key {public_key} or corrupt ({msg})") from exc
    except Exception as exc:  # protobuf/json decode errors, bad PEM, cryptography InvalidSignature
        raise SignatureError(f"{sig}: signature not made by the key {public_key} or unreadable "
                             f"({type(exc).__name__}: {exc})") from exc


def _describe_mismatch(msg: str) -> str:
    """model-signing's diff message, reworded: changed/added/removed files by name."""
    parts = []
    changed = _MISMATCH.findall(msg)
    if changed:
        parts.append(f"hash mismatch (changed since signing): {', '.join(changed)}")
    m = _EXTRA.search(msg)
    if m:
        parts.append(f"files added since signing: {m.group(1).strip()}")
    m = _MISSING.search(msg)
    if m:
        parts.append(f"files removed since signing: {m.group(1).strip()}")
    return "signature does not match the files: " + ("; ".join(parts) if parts else msg)
