"""Import an ImageFolder tree into the raw layout (lathe.data.contract).

Source layout: one sub-folder per class, images at any depth below it::

    src/<class>/<any nesting>/<image>          ->   dest/images/<class>/<same nesting>/<image>
                                                    dest/labels.csv: file,label

- Classes are the immediate sub-folders of `src`, sorted by name; each name must be a usable class
  name (contract.CLASS_NAME) and each class must hold at least one image.
- Images are files ending .png .jpg .jpeg .bmp .tif .tiff (any case). Hidden files and folders (a name
  starting with ".") are ignored; other files are skipped and counted (`scan_folder`, and a log line).
- labels.csv rows are sorted by (class, relative path), paths with forward slashes, written with
  csv.writer and "\\n" line ends: the same source gives a byte-identical labels.csv on any machine.
- mode "copy" copies each file byte for byte; mode "link" makes each one a symlink to the source file's
  absolute resolved path (no copy: DVC then hashes and caches the link targets' content, so the source
  must stay where it is until `dvc add` has run).
- Refused (DataError naming the path): `src` not a folder, no class folders, a class without images, a bad
  class name, a symlink in `src` pointing outside it (or to a folder, or nowhere), a file name that is
  not UTF-8 or holds control characters, `dest` inside `src`, and a `dest` that already has a
  labels.csv (a dataset is never overwritten). labels.csv is written last, so an interrupted import
  leaves none and may simply be run again.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from lathe.data.contract import CLASS_NAME, LABELS_FILE, REQUIRED_COLUMNS
from lathe.errors import DataError
from lathe.io import atomic_path, printable, write_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMPORT_MODES = ("copy", "link")
IMAGES_DIR = "images"  # under dest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderScan:
    """What an import would take: each class's images (paths relative to the class folder, forward
    slashes, sorted) in class order, and the non-image files it would skip (relative to `src`)."""

    images: dict[str, list[str]]
    skipped: list[str]


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _p(path: Path) -> str:
    """A path for a message: non-printable characters escaped."""
    return printable(str(path), limit=1000)


def _check_link(path: Path, root: Path, src: Path) -> None:
    """Refuse a symlink that points outside `root` (the resolved `src`), to a folder, or nowhere."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise DataError(f"{_p(path)}: unresolvable symlink ({exc})") from exc
    if target != root and root not in target.parents:
        raise DataError(f"{_p(path)}: symlink points outside {_p(src)} (to {_p(target)})")
    if target.is_dir():
        raise DataError(f"{_p(path)}: symlink to a folder, which is not followed (put the folder itself there)")
    if not target.exists():
        raise DataError(f"{_p(path)}: broken symlink (to {_p(target)})")


def _check_name(path: Path, rel: str) -> None:
    """Refuse a file name labels.csv cannot carry safely (not UTF-8, or with control characters)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{_p(path)}: file name is not valid UTF-8") from exc
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        raise DataError(f"{_p(path)}: file name holds control characters")


def _unreadable(exc: OSError) -> NoReturn:
    raise DataError(f"{_p(Path(exc.filename or '?'))}: cannot read ({exc.strerror})") from exc


def classes_of(src: Path) -> list[str]:
    """The class folder names of `src`, sorted: the `data.classes` list for params.yaml."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{_p(src)}: not a folder (expected one sub-folder per class, images inside)")
    root, names = src.resolve(), []
    try:
        entries = sorted(os.scandir(src), key=lambda e: e.name)
    except OSError as exc:
        _unreadable(exc)
    for entry in entries:
        path = src / entry.name
        if _hidden(entry.name) or not entry.is_dir():  # follows a symlink: one to a folder is checked
            continue
        if entry.is_symlink():
            _check_link(path, root, src)
        if not re.fullmatch(CLASS_NAME, entry.name):
            raise DataError(f"{_p(path)}: {entry.name!r} is not a usable class name (letters, digits, space and "
                            "_ . + -, starting with a letter or digit, at most 100 characters)")
        names.append(entry.name)
    if not names:
        raise DataError(f"{_p(src)}: no class sub-folders (expected {_p(src)}/<class>/<image>)")
    return names


def scan_folder(src: Path) -> FolderScan:
    """Walk `src` once and check it (see the module doc); nothing is written."""
    src = Path(src)
    classes, root = classes_of(src), src.resolve()
    skipped = []  # files beside the class folders have no class
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if not _hidden(entry.name) and not entry.is_dir():
            if entry.is_symlink():
                _check_link(src / entry.name, root, src)
            skipped.append(entry.name)
    images: dict[str, list[str]] = {}
    for name in classes:
        class_dir, found = src / name, []
        for dirpath, dirnames, filenames in os.walk(class_dir, onerror=_unreadable):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
            for child in [*dirnames, *filenames]:
                if not _hidden(child) and (here / child).is_symlink():
                    _check_link(here / child, root, src)
            for file in sorted(f for f in filenames if not _hidden(f)):
                rel = (here / file).relative_to(class_dir).as_posix()
                _check_name(here / file, rel)
                if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(rel)
                else:
                    skipped.append(f"{name}/{rel}")
        if not found:
            raise DataError(f"{_p(class_dir)}: no images ({' '.join(IMAGE_EXTENSIONS)}) in this class folder")
        images[name] = sorted(found)
    return FolderScan(images=images, skipped=sorted(skipped))


def _place(source: Path, target: Path, mode: str) -> None:
    """Copy or symlink one file, atomically (an interrupted import's leftover is replaced)."""
    try:
        with atomic_path(target) as tmp:
            if mode == "copy":
                shutil.copyfile(source, tmp)
            else:
                tmp.unlink()
                os.symlink(source.resolve(), tmp)
    except OSError as exc:
        raise DataError(f"{_p(source)}: cannot {mode} to {_p(target)} ({exc.strerror or exc})") from exc


def import_folder(src: Path, dest: Path, mode: str = "copy") -> dict[str, int]:
    """Import the ImageFolder tree `src` into the raw layout at `dest`; returns {class: image count}."""
    if mode not in IMPORT_MODES:
        raise ValueError(f"unknown import mode {mode!r}; use one of {', '.join(IMPORT_MODES)}")
    src, dest = Path(src), Path(dest)
    labels = dest / LABELS_FILE
    if labels.exists() or labels.is_symlink():
        raise DataError(f"{_p(labels)}: already exists; import into a new folder (a dataset is never overwritten)")
    if src.is_dir() and (dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents):
        raise DataError(f"{_p(dest)}: inside the source folder {_p(src)}; import somewhere else")
    scan = scan_folder(src)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(REQUIRED_COLUMNS)
    for name, rels in scan.images.items():
        for rel in rels:
            file = f"{IMAGES_DIR}/{name}/{rel}"
            _place(src / name / rel, dest / file, mode)
            writer.writerow([file, name])
    write_text(labels, buf.getvalue())
    if scan.skipped:
        log.info("skipped %d non-image file(s) in %s, e.g. %s", len(scan.skipped), src, scan.skipped[0])
    return {name: len(rels) for name, rels in scan.images.items()}
