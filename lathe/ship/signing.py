"""Package signing: a local EC P-256 key pair and OpenSSF model signing (model-signing 1.1.1), offline.

The signature file sits inside the package folder (`<pkg>/signature`) and covers every other file
of the folder as shipped (model.onnx stamped). The signature file itself is excluded from the
hashed set; git helper paths (.gitignore, ...) are NOT excluded, so a stray file of any name is
caught.

One home for the key paths and their environment overrides. A key is named by its fingerprint: the
sha256 of its public key in canonical PEM (SubjectPublicKeyInfo), which is also the key hint
model-signing writes into every signature, so a signature names the key that made it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import os
import re
from pathlib import Path

from lathe.errors import LatheError

# Where `lathe keys init` puts the signing pair, relative to the repository (git-ignored); the
# package stage's default key. One home: lathe.ship.signing imports it from here (config imports
# nothing of lathe but errors, so every stage does not depend on the signing code).
DEFAULT_PRIVATE_KEY = Path(".lathe/keys/signing-key.pem")


ENV_SIGNING_KEY = "LATHE_SIGNING_KEY"  # a private key file for the package stage (overrides package.private_key)


def signing_key_path(private_key: str | Path, root: Path) -> Path:
    """The package stage's signing key: env LATHE_SIGNING_KEY, else `private_key` (relative to `root`, the repo)."""
    key = Path(os.environ.get(ENV_SIGNING_KEY) or private_key)
    return key if key.is_absolute() else Path(root) / key


SIGNATURE_FILE = "signature"  # inside the package folder, covering every other file
DEFAULT_PUBLIC_KEY = Path(".lathe/keys/signing-key.pub")
KEYRING_DIR = Path(".lathe/trusted-keys")  # the repository's keyring: public keys verify and trace trust
ENV_PUBLIC_KEY = "LATHE_PUBLIC_KEY"  # one trusted public key file (overrides every keyring)
ENV_KEYRING = "LATHE_KEYRING"  # a keyring folder (overrides the repository's)
MAX_KEY_BYTES = 16 * 1024  # a PEM public key is ~180 bytes
MAX_SIGNATURE_BYTES = 256 * 1024  # ours are ~1.5 KB: an in-toto statement with one hash per file
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model-signing accepts


class SignatureError(LatheError):
    """A package signature is missing, made by another key, or does not match the files."""


class KeyFileError(LatheError):
    """A key file is missing, unreadable or not a supported EC key."""


def _read_small(path: Path, limit: int, what: str) -> bytes:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise KeyFileError(f"{path}: {size} bytes is too large for a {what} (limit {limit})")
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} not found") from None
    except OSError as exc:
        raise KeyFileError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None


def public_key_pem(path: Path) -> bytes:
    """The canonical PEM of the EC public key in `path` (raises KeyFileError naming the file)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read_small(path, MAX_KEY_BYTES, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in SUPPORTED_CURVES:
        raise KeyFileError(f"{path}: not an EC public key on {', '.join(SUPPORTED_CURVES)}")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_pem_of_private(path: Path) -> bytes:
    """The canonical PEM of the public half of the EC private key in `path` (raises KeyFileError naming
    the file): what a package signed with that key verifies against."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read_small(path, MAX_KEY_BYTES, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({_first_line(str(exc))})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in SUPPORTED_CURVES:
        raise KeyFileError(f"{path}: not an EC private key on {', '.join(SUPPORTED_CURVES)}")
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(pem: bytes) -> str:
    """sha256 hex of a canonical PEM public key (model-signing's key hint)."""
    return hashlib.sha256(pem).hexdigest()


def key_fingerprint(path: Path) -> str:
    """The fingerprint of the public key in `path`."""
    return fingerprint(public_key_pem(path))


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
    write_key_file(private_path, private_pem, 0o600)
    write_key_file(public_path, public_pem, 0o644)


def write_key_file(dest: Path, data: bytes, mode: int) -> None:
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


def read_signature(pkg_dir: Path) -> dict:
    """The signature bundle of `pkg_dir` as JSON, checked to be in the canonical form model-signing writes.

    Compact JSON in model-signing's key order: anything else (added whitespace, re-ordered or
    duplicated keys) was not written by a signer and is refused, so an edit of the signature file
    that leaves its meaning alone is still caught.
    """
    sig = Path(pkg_dir) / SIGNATURE_FILE
    if not sig.is_file() or sig.is_symlink():
        raise SignatureError(f"{SIGNATURE_FILE}: missing (the package is unsigned)")
    raw = _read_small(sig, MAX_SIGNATURE_BYTES, "signature")
    try:
        text = raw.decode("utf-8")
        bundle = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(f"{SIGNATURE_FILE}: not a signature bundle (not UTF-8 JSON: {exc})") from None
    if not isinstance(bundle, dict) or json.dumps(bundle, separators=(",", ":")) != text:
        raise SignatureError(f"{SIGNATURE_FILE}: not in the canonical form a signer writes (edited by hand?)")
    envelope: dict = bundle["dsseEnvelope"] if isinstance(bundle.get("dsseEnvelope"), dict) else {}
    encoded = [envelope.get("payload")] + [s.get("sig") for s in envelope.get("signatures") or [] if isinstance(s, dict)]
    if not all(isinstance(v, str) and _canonical_base64(v) for v in encoded):
        raise SignatureError(f"{SIGNATURE_FILE}: payload or signature is not canonical base64 (edited by hand?)")
    return bundle


def _canonical_base64(value: str) -> bool:
    """Decodes, and re-encodes to the same text: base64's spare bits in the last character cannot be altered."""
    try:
        return base64.b64encode(base64.b64decode(value, validate=True)).decode("ascii") == value
    except (ValueError, binascii.Error):
        return False


def signature_key_hint(bundle: dict) -> str | None:
    """The signing key's fingerprint as the signature states it (verified only by `verify_signature`)."""
    hint = ((bundle.get("verificationMaterial") or {}).get("publicKey") or {}).get("hint")
    return hint if isinstance(hint, str) and re.fullmatch(r"[0-9a-f]{64}", hint) else None


# model-signing lists its diff as a repr()'d list, so quotes may arrive backslash-escaped
_MISMATCH = re.compile(r"Hash mismatch for \\*'([^'\\]+)\\*'")
_EXTRA = re.compile(r"Extra files found in model \\*'[^']*\\*': ([^\"\]]+?)(?:\\*['\"]|\]|$)")
_MISSING = re.compile(r"Missing files in model \\*'[^']*\\*': ([^\"\]]+?)(?:\\*['\"]|\]|$)")


def verify_signature(pkg_dir: Path, public_key: Path) -> None:
    """Check `pkg_dir/signature` against the files of `pkg_dir` with `public_key`.

    Raises SignatureError naming the problem: no signature, unreadable or non-canonical signature,
    signed by another key, or which files were added, removed or changed since signing.
    """
    from model_signing import verifying

    pkg_dir = _check_dir(pkg_dir)
    public_key_pem(public_key)  # a clear message for a bad key file before model-signing sees it
    read_signature(pkg_dir)
    cfg = verifying.Config().use_elliptic_key_verifier(public_key=Path(public_key))
    cfg.set_hashing_config(_hashing_config())
    sig = pkg_dir / SIGNATURE_FILE
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # model-signing prints format warnings
            cfg.verify(pkg_dir, sig)
    except ValueError as exc:
        msg = str(exc)
        if msg.startswith("Signature mismatch"):
            raise SignatureError(_describe_mismatch(msg)) from None
        if msg.startswith("Key mismatch"):
            raise SignatureError("signed by another key") from None
        raise SignatureError(f"{SIGNATURE_FILE}: not a valid signature by this key ({_first_line(msg)})") from None
    except Exception as exc:  # protobuf/json decode errors, cryptography InvalidSignature, bad bundles
        raise SignatureError(f"{SIGNATURE_FILE}: not a valid signature by this key "
                             f"({type(exc).__name__}{': ' + _first_line(str(exc)) if str(exc) else ''})") from None


def _first_line(msg: str, limit: int = 200) -> str:
    line = msg.strip().splitlines()[0] if msg.strip() else ""
    return line[:limit] + ("..." if len(line) > limit else "")


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
    return "signature does not match the files: " + ("; ".join(parts) if parts else _first_line(msg))
