"""Shipping archives: a deterministic tar.gz of a package folder, and an extractor for untrusted ones.

Archive layout (docs/package-format.md): the folder's files under `<target>/`, sorted, mode 0644,
uid/gid 0, empty owner names, mtime = the manifest's build time, gzip header mtime 0.

Extraction treats the archive as hostile. It streams: each member's header is checked before its
bytes are written, the decompressed stream is counted as it is read (a gzip bomb stops at the limit,
not after), and the whole extraction has a deadline. Only the package layout is accepted: one
folder named like a target, holding regular files with plain names. Anything else ends the
extraction, the partial folder is removed, and the error names the member (control characters
escaped).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from lathe.errors import LatheError
from lathe.io import atomic_path, printable, sha256_file, write_text
from lathe.ship.contract import MAX_FILE_BYTES
from lathe.ship.params import TARGET_NAME

FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # a package file: no folders, no odd characters
CHUNK = 1 << 16


class ArchiveError(LatheError):
    """An archive is unreadable or holds a member that must not be extracted."""


@dataclass(frozen=True)
class Limits:
    """What an untrusted package archive may hold; a real package is a few MB in 6 members."""

    archive_bytes: int = sum(MAX_FILE_BYTES.values())  # the .tar.gz on disk (compression may be none)
    member_bytes: int = max(MAX_FILE_BYTES.values())  # one file
    total_bytes: int = sum(MAX_FILE_BYTES.values())  # every member together, decompressed
    members: int = 64
    seconds: float = 30.0


def archive_bytes(pkg_dir: Path, mtime: int) -> bytes:
    """The deterministic tar.gz bytes of `pkg_dir` (regular files only; sub-folders are refused)."""
    pkg_dir = Path(pkg_dir)
    if not pkg_dir.is_dir():
        raise ArchiveError(f"{pkg_dir}: not a package folder")
    entries = sorted(pkg_dir.iterdir(), key=lambda p: p.name)
    raw = io.BytesIO()
    # format=PAX would add non-deterministic headers only for long names/large values; GNU is stable
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path in entries:
            if path.is_symlink() or not path.is_file():
                raise ArchiveError(f"{path}: only regular files can be packed (no folders or links)")
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{pkg_dir.name}/{path.name}")
            info.size = len(data)
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = int(mtime)
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of names and times
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def write_archive(pkg_dir: Path, dest_tar_gz: Path, mtime: int) -> str:
    """Atomically write the archive of `pkg_dir` to `dest_tar_gz` and `<dest>.sha256`; return the hex sha256."""
    dest = Path(dest_tar_gz)
    data = archive_bytes(pkg_dir, mtime)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    digest = sha256_file(dest)
    write_text(dest.with_name(dest.name + ".sha256"), f"{digest}  {dest.name}\n")
    return digest


class _Budget(io.RawIOBase):
    """A read-only stream over decompressed bytes that refuses to go past `limit` or `deadline`."""

    def __init__(self, src, limit: int, deadline: float, archive: Path) -> None:
        self.src, self.limit, self.deadline, self.archive, self.read_so_far = src, limit, deadline, archive, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if time.monotonic() > self.deadline:
            raise ArchiveError(f"{self.archive}: extraction took longer than its time limit; refused")
        want = min(len(buf), self.limit + 1 - self.read_so_far)
        if want <= 0:
            raise ArchiveError(f"{self.archive}: decompresses to more than {self.limit} bytes; refused "
                               "(a decompression bomb, or not a package)")
        data = self.src.read(want)
        buf[: len(data)] = data
        self.read_so_far += len(data)
        return len(data)


def _member_problem(m: tarfile.TarInfo, top: str | None, seen: set[str], limits: Limits) -> str | None:
    """Why member `m` breaks the package layout, or None (a regular file `<top>/<plain name>` or the folder)."""
    parts = m.name.split("/")
    if m.isdir() and (len(parts) == 1 or (len(parts) == 2 and parts[1] == "")):
        return None if re.match(TARGET_NAME, parts[0]) and (top in (None, parts[0])) else (
            "a second top-level folder" if top not in (None, parts[0]) else "top-level folder is not a target name")
    if not m.isreg():
        kind = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hardlink", tarfile.CHRTYPE: "a device file",
                tarfile.BLKTYPE: "a device file", tarfile.FIFOTYPE: "a fifo", tarfile.DIRTYPE: "a nested folder"}
        return f"{kind.get(m.type, f'not a regular file (type {m.type!r})')}; a package holds regular files only"
    if len(parts) != 2 or not re.match(TARGET_NAME, parts[0]) or not FILE_NAME.match(parts[1]):
        return ("not <target>/<file>: a package archive holds one folder named like a target with plain "
                "file names (letters, digits, '.', '_', '-'; no sub-folders)")
    if top is not None and parts[0] != top:
        return f"a second top-level folder (the first was {top!r})"
    if m.name in seen:
        return "duplicate member"
    if m.size > limits.member_bytes:
        return f"{m.size} bytes > limit {limits.member_bytes}"
    return None


def extract_package(archive: Path, dest: Path, limits: Limits = Limits()) -> Path:
    """Extract a package archive into `dest` (new or empty); return the package folder `dest/<target>`.

    Raises ArchiveError naming the archive and member; `dest` is then removed if this call made it,
    or emptied of what it wrote.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveError(f"{dest}: extraction target must be a new or empty folder")
    try:
        size = archive.stat().st_size
    except OSError as exc:
        raise ArchiveError(f"{archive}: cannot be read ({exc.strerror or exc})") from None
    if size > limits.archive_bytes:
        raise ArchiveError(f"{archive}: {size} bytes > limit {limits.archive_bytes}; refused")
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return _extract(archive, dest, limits)
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for p in dest.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise


def _extract(archive: Path, dest: Path, limits: Limits) -> Path:
    deadline = time.monotonic() + limits.seconds
    top: str | None = None
    seen: set[str] = set()
    total = 0
    with open(archive, "rb") as raw:
        try:
            magic = raw.read(2)
            raw.seek(0)
            source = gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw
            # headers count too (a huge PAX or GNU long-name header is read into memory by tarfile)
            budget = _Budget(source, limits.total_bytes + 1024 * (limits.members + 2), deadline, archive)
            with tarfile.open(fileobj=io.BufferedReader(budget, CHUNK), mode="r|") as tar:
                for m in tar:
                    name = printable(m.name)
                    if len(seen) >= limits.members:
                        raise ArchiveError(f"{archive}: more than {limits.members} members; refused")
                    why = _member_problem(m, top, seen, limits)
                    if why:
                        raise ArchiveError(f"{archive}: member {name}: {why}; nothing extracted")
                    top = m.name.split("/")[0]
                    if m.isdir():
                        continue
                    total += m.size
                    if total > limits.total_bytes:
                        raise ArchiveError(f"{archive}: members add up to more than {limits.total_bytes} bytes; refused")
                    seen.add(m.name)
                    _write_member(tar, m, dest, archive, name)
        except ArchiveError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise ArchiveError(f"{archive}: not a readable tar.gz archive ({type(exc).__name__}: "
                               f"{printable(str(exc))})") from None
    if top is None or not seen:
        raise ArchiveError(f"{archive}: holds no package files")
    return dest / top


def _write_member(tar: tarfile.TarFile, m: tarfile.TarInfo, dest: Path, archive: Path, name: str) -> None:
    folder, file = m.name.split("/")
    target = dest / folder / file
    src = tar.extractfile(m)
    if src is None:
        raise ArchiveError(f"{archive}: member {name}: no data")
    try:
        target.parent.mkdir(exist_ok=True, mode=0o755)
        # O_EXCL: never follow or overwrite something already there
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
    except OSError as exc:
        raise ArchiveError(f"{archive}: cannot write member {name} to {dest}: {exc.strerror or exc}") from None
