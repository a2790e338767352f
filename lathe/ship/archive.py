"""Shipping archives: a deterministic tar.gz of a package folder, and an extractor that refuses
anything unsafe before writing a byte.

Archive layout (docs/package-format.md): the folder's files under `<target>/`, sorted, mode 0644,
uid/gid 0, empty owner names, mtime = the manifest's build time, gzip header mtime 0.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from lathe.errors import LatheError
from lathe.io import atomic_path, sha256_file, write_text

MAX_MEMBER_BYTES = 512 * 1024 * 1024  # one file of a package: a model is KBs to a few MBs
MAX_TOTAL_BYTES = 1024 * 1024 * 1024
MAX_MEMBERS = 1000


class ArchiveError(LatheError):
    """An archive is unreadable or holds a member that must not be extracted."""


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


def _check_member(m: tarfile.TarInfo, max_member_bytes: int) -> str | None:
    """Why `m` must not be extracted, or None when it is a plain file (or folder) with a safe name."""
    name = m.name
    if not name or "\x00" in name:
        return "empty or NUL in name"
    if name.startswith("/") or name.startswith("\\") or PurePosixPath(name).is_absolute() or (
            len(name) > 1 and name[1] == ":"):
        return "absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "path climbs out with '..'"
    if m.issym():
        return f"symlink (-> {m.linkname})"
    if m.islnk():
        return f"hardlink (-> {m.linkname})"
    if m.ischr() or m.isblk():
        return "device file"
    if m.isfifo():
        return "fifo"
    if not (m.isreg() or m.isdir()):
        return f"not a regular file (type {m.type!r})"
    if m.isreg() and m.size > max_member_bytes:
        return f"oversize: {m.size} bytes > limit {max_member_bytes}"
    return None


def check_members(members: list[tarfile.TarInfo], max_member_bytes: int = MAX_MEMBER_BYTES,
                  max_total_bytes: int = MAX_TOTAL_BYTES) -> None:
    """Raise ArchiveError listing every unsafe member (see `safe_extract`)."""
    problems = []
    seen: set[str] = set()
    total = 0
    if len(members) > MAX_MEMBERS:
        problems.append(f"{len(members)} members > limit {MAX_MEMBERS}")
    for m in members:
        why = _check_member(m, max_member_bytes)
        if why:
            problems.append(f"{m.name!r}: {why}")
            continue
        norm = str(PurePosixPath(m.name.replace("\\", "/")))
        if norm in seen:
            problems.append(f"{m.name!r}: duplicate name")
        seen.add(norm)
        if m.isreg():
            total += m.size
    if total > max_total_bytes:
        problems.append(f"total size {total} bytes > limit {max_total_bytes}")
    if problems:
        raise ArchiveError("unsafe archive, nothing extracted: " + "; ".join(problems))


def safe_extract(archive: Path, dest: Path, max_member_bytes: int = MAX_MEMBER_BYTES,
                 max_total_bytes: int = MAX_TOTAL_BYTES) -> list[Path]:
    """Extract a tar(.gz) into `dest` (new or empty) after checking every member; return the files written.

    Refused before anything is written: absolute paths, `..`, symlinks, hardlinks, device files,
    fifos and other non-regular members, members over `max_member_bytes`, a total over
    `max_total_bytes`, duplicate names. Files are written with mode 0644, folders 0755; owners,
    times and permissions from the archive are ignored. On an error midway `dest` is removed if this
    call created it.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveError(f"{dest}: extraction target must be a new or empty folder")
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"{archive}: not a readable tar archive ({exc})") from exc
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"{archive}: corrupt archive ({exc})") from exc
        try:
            check_members(members, max_member_bytes, max_total_bytes)
        except ArchiveError as exc:
            raise ArchiveError(f"{archive}: {exc}") from exc
        created = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        written = []
        try:
            for m in members:
                target = (root / m.name).resolve()
                if not target.is_relative_to(root):  # belt and braces after the name checks
                    raise ArchiveError(f"{archive}: {m.name!r} resolves outside {dest}")
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True, mode=0o755)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                # O_EXCL: never follow or overwrite something already there
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                written.append(target)
        except BaseException:
            if created:
                shutil.rmtree(dest, ignore_errors=True)
            raise
    return written
