"""Trust anchors: which public keys verify and trace accept, and where they came from.

Keys come only from, in this order:
1. `--public-key FILE` (one key),
2. `$LATHE_PUBLIC_KEY` (one key file),
3. `--keyring DIR` or `$LATHE_KEYRING` (every `*.pub` in the folder),
4. the repository's keyring `<repo>/.lathe/trusted-keys/`, the repository being `--repo` or the git
   work tree around the working directory,
5. the user's keyring `$XDG_CONFIG_HOME/lathe/trusted-keys/` (default `~/.config/...`).

Never from the thing being verified: a key file or keyring inside the package folder, or inside
the folder that holds it (where an archive unpacked by hand puts whatever it carries), is refused
and the refusal is reported. Keys are named by fingerprint (lathe.ship.signing.fingerprint).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from lathe.errors import LatheError
from lathe.ship.signing import (
    ENV_KEYRING,
    ENV_PUBLIC_KEY,
    KEYRING_DIR,
    KeyFileError,
    fingerprint,
    public_key_pem,
    public_key_pem_of_private,
)

MAX_KEYRING_KEYS = 64


@dataclass(frozen=True)
class TrustedKey:
    path: Path
    fingerprint: str  # sha256 hex of the canonical PEM
    shown_as: str = ""  # how a verdict names the key's file, when `path` is a scratch copy (else the path)

    @property
    def shown(self) -> str:
        return self.shown_as or str(self.path)

    @property
    def short(self) -> str:
        return f"sha256:{self.fingerprint[:16]}"


@dataclass
class Trust:
    """The keys a verification may accept, where they came from, and what was refused on the way."""

    keys: list[TrustedKey] = field(default_factory=list)
    source: str = "none"  # e.g. "--public-key /path", "keyring /repo/.lathe/trusted-keys"
    problems: list[str] = field(default_factory=list)  # refused or unreadable key files (one line each)

    def by_fingerprint(self, fp: str | None) -> TrustedKey | None:
        return next((k for k in self.keys if k.fingerprint == fp), None)


def git_toplevel(start: Path) -> Path | None:
    """The git work tree around `start`, or None."""
    try:
        res = subprocess.run(["git", "-C", str(start), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(res.stdout.strip()) if res.returncode == 0 and res.stdout.strip() else None


def user_keyring() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lathe" / "trusted-keys"


def repo_keyring(repo: Path | None) -> Path | None:
    """`<repo>/.lathe/trusted-keys` for `repo`, or for the git work tree around the cwd."""
    top = git_toplevel(Path(repo)) if repo is not None else git_toplevel(Path.cwd())
    return top / KEYRING_DIR if top is not None else None


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _untrusted_location(path: Path, subject: Path | None) -> str | None:
    """Why a key at `path` cannot anchor trust for `subject` (inside it, or beside it), or None."""
    if subject is None:
        return None
    subject = Path(subject)
    if _inside(path, subject):
        return f"it lies inside {subject}, the package being verified"
    if _inside(path, subject.parent):
        return f"it lies beside the package, under {subject.parent} (where an unpacked archive puts its own files)"
    return None


def _load(path: Path, subject: Path | None, problems: list[str]) -> TrustedKey | None:
    why = _untrusted_location(path, subject)
    if why:
        problems.append(f"refused key {path}: {why}")
        return None
    try:
        return TrustedKey(path, fingerprint(public_key_pem(path)))
    except KeyFileError as exc:
        problems.append(f"skipped key: {exc}")
        return None


def keyring_keys(folder: Path, subject: Path | None, problems: list[str]) -> list[TrustedKey]:
    """Every readable `*.pub` key in `folder` (sorted by name; duplicates by fingerprint dropped)."""
    why = _untrusted_location(folder, subject)
    if why:
        problems.append(f"refused keyring {folder}: {why}")
        return []
    files = sorted(folder.glob("*.pub"))[:MAX_KEYRING_KEYS] if folder.is_dir() else []
    out: dict[str, TrustedKey] = {}
    for path in files:
        key = _load(path, subject, problems)
        if key is not None:
            out.setdefault(key.fingerprint, key)
    return list(out.values())


def resolve_trust(subject: Path | None = None, public_key: Path | None = None, keyring: Path | None = None,
                  repo: Path | None = None) -> Trust:
    """The trusted keys for verifying `subject` (a package folder or archive), by the order in the module doc.

    The first source that is given decides (a given but unusable source does not fall through to
    the next: an explicit choice that fails must not be silently replaced by another).
    """
    trust = Trust()
    env_key = os.environ.get(ENV_PUBLIC_KEY)
    env_ring = os.environ.get(ENV_KEYRING)
    if public_key is not None or env_key:
        path = Path(public_key) if public_key is not None else Path(env_key or "")
        trust.source = f"--public-key {path}" if public_key is not None else f"${ENV_PUBLIC_KEY} {path}"
        key = _load(path, subject, trust.problems)
        trust.keys = [key] if key else []
        return trust
    if keyring is not None or env_ring:
        folder = Path(keyring) if keyring is not None else Path(env_ring or "")
        trust.source = f"keyring {folder}" + ("" if keyring is not None else f" (${ENV_KEYRING})")
        if not folder.is_dir():
            trust.problems.append(f"keyring {folder} is not a folder")
        trust.keys = keyring_keys(folder, subject, trust.problems)
        return trust
    for found in (repo_keyring(repo), user_keyring()):
        if found is not None and found.is_dir():
            trust.source = f"keyring {found}"
            trust.keys = keyring_keys(found, subject, trust.problems)
            return trust
    looked = [str(f) for f in (repo_keyring(repo), user_keyring()) if f is not None]
    trust.problems.append(f"no trusted key: pass --public-key, set ${ENV_PUBLIC_KEY}, or add keys with "
                          f"`lathe keys add` (looked in {', '.join(looked)})")
    return trust


def add_to_keyring(public_key: Path, folder: Path) -> TrustedKey:
    """Copy a public key into `folder` as `<fingerprint[:16]>.pub` (canonical PEM); idempotent."""
    from lathe.ship.signing import write_key_file

    pem = public_key_pem(public_key)
    fp = fingerprint(pem)
    dest = Path(folder) / f"{fp[:16]}.pub"
    if not dest.is_file() or dest.read_bytes() != pem:
        write_key_file(dest, pem, 0o644)
    return TrustedKey(dest, fp)


def remove_from_keyring(prefix: str, folder: Path) -> list[TrustedKey]:
    """Delete every key of `folder` whose fingerprint starts with `prefix` (at least 8 hex); returns them."""
    prefix = prefix.lower().removeprefix("sha256:")
    if len(prefix) < 8:
        raise LatheError(f"fingerprint prefix {prefix!r} is too short: give at least 8 hex digits")
    problems: list[str] = []
    gone = [k for k in keyring_keys(Path(folder), None, problems) if k.fingerprint.startswith(prefix)]
    if not gone:
        raise LatheError(f"no key with fingerprint {prefix}... in {folder}")
    for key in gone:
        key.path.unlink()
    return gone


def rebuild_key_trust(signing_key: Path, folder: Path, verified_with: Trust) -> Trust:
    """The one key a rebuilt package is checked against: the public half of the key the rebuild signed
    with (written to `folder`). Not a trust anchor for the package verified: a rebuild on an auditor's
    machine signs with the auditor's key, not the builder's, and its signature only shows that the
    rebuilt files are the ones the rebuild signed. `verified_with` (the verify's trust) says whether it
    is the package's signer too."""
    trust = Trust(source=f"this rebuild's signing key {signing_key}")
    try:
        pem = public_key_pem_of_private(signing_key)
    except KeyFileError as exc:
        trust.problems.append(f"the rebuild's signing key: {exc}")
        return trust
    fp = fingerprint(pem)
    public = Path(folder) / "rebuild-signing-key.pub"
    public.write_bytes(pem)
    trust.keys = [TrustedKey(public, fp, shown_as="its public half, derived here")]
    also = ("also a trusted key of this verify" if verified_with.by_fingerprint(fp) is not None
            else "not one of this verify's trusted keys: a rebuild signs with its own machine's key")
    trust.source += f" ({also})"
    return trust
