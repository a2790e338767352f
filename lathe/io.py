"""File I/O shared by every stage: atomic writes, scratch folders, hashes, arrays, JSON.

Writes go to a temp file in the destination folder and are moved in with `os.replace`, so a
killed process leaves the old file or none, never half of one. Temp files and scratch folders
carry the writer's pid; whoever comes next removes those of dead pids, so a SIGKILL leaves
nothing behind for long.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save

SCRATCH_DIR = Path(".lathe") / "tmp"  # under the repo root; git-ignored, not a DVC out
_SCRATCH_NAME = re.compile(r"^(?P<name>.+)-(?P<pid>\d+)$")
# `.<name>.<pid>.<random>.tmp`: a temp file or folder beside <name>, written by process <pid>
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def temp_prefix(dest: Path) -> str:
    """Prefix of this process's temp names beside `dest`: `.<name>.<pid>.` (then 8 random chars, `.tmp`)."""
    return f".{Path(dest).name}.{os.getpid()}."


def _dead_temp(path: Path, name: str | None = None) -> bool:
    """Whether `path` is a temp file/folder of ours (for `name`, if given) whose writer is dead."""
    match = _TEMP_NAME.match(path.name)
    if match is None:
        return False
    return (name is None or match.group("name") == name) and not pid_alive(int(match.group("pid")))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_dead_temps(dest: Path) -> list[Path]:
    """Remove the temp siblings of `dest` (files or folders) whose writer is dead; returns them."""
    dest = Path(dest)
    dead = [p for p in sorted(dest.parent.glob(f".{dest.name}.*.tmp")) if _dead_temp(p, dest.name)]
    for path in dead:
        _remove(path)
    return dead


def remove_under(root: Path, is_litter: Callable[[Path], bool]) -> list[Path]:
    """Remove every file or folder under `root` for which `is_litter(path)` holds; returns them.

    Hidden folders directly under `root` (.git, .dvc, .venv, .lathe) are not searched, nor is the
    inside of a folder that is itself removed.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == Path(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [here / name for name in [*dirnames, *filenames] if is_litter(here / name)]
        dirnames[:] = [d for d in dirnames if here / d not in found]
    for path in found:
        _remove(path)
    return found


def remove_dead_temps_under(root: Path) -> list[Path]:
    """Remove every temp file/folder of a dead writer (`temp_prefix` names) under `root`.

    For a stage DVC skips after a kill (its declared outputs were intact), so its own next start
    never comes to clean them.
    """
    return remove_under(root, _dead_temp)


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success it replaces `dest`, on error it is removed.

    The temp name holds the pid, so the next writer of `dest` removes what a killed one left.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(dest)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_dead_scratch(root: Path) -> list[Path]:
    """Remove `root`/.lathe/tmp/<name>-<pid> folders whose process is dead; returns them."""
    removed = []
    scratch = Path(root) / SCRATCH_DIR
    for path in sorted(scratch.iterdir()) if scratch.is_dir() else []:
        match = _SCRATCH_NAME.match(path.name)
        if match and not pid_alive(int(match.group("pid"))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def scratch_tempdir(root: Path, name: str) -> Iterator[Path]:
    """Make `root`/.lathe/tmp/<name>-<pid>/ this process's temp folder for the block, then delete it.

    Every `tempfile` user in the process (torch.onnx export, onnxruntime's quant_pre_process) and
    every child (through TMPDIR) writes there, so a SIGKILL leaves its temp files inside the repo,
    where the next stage (or flow task) to start removes them, instead of piling up in /tmp.
    """
    remove_dead_scratch(root)
    path = Path(root).resolve() / SCRATCH_DIR / f"{name}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    old_tempdir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(path), str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = old_tempdir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        shutil.rmtree(path, ignore_errors=True)


def write_bytes(dest: Path, data: bytes) -> None:
    """Atomically write `data` to `dest`."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: Path, text: str) -> None:
    """Atomically write UTF-8 `text` to `dest`."""
    write_bytes(dest, text.encode("utf-8"))


def write_json(dest: Path, obj: Any) -> None:
    """Atomically write `obj` as stable, sorted, indented JSON (byte-identical across runs)."""
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def printable(text: str, limit: int = 200) -> str:
    """`text` safe to print: control and other non-printable characters escaped (\\x1b, \\udcff), cut at `limit`.

    For names and strings that come from outside (archive members, manifest values): a terminal
    never receives raw escape sequences from a package.
    """
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                  for ch in str(text))
    return out if len(out) <= limit else f"{out[:limit]}... ({len(out)} characters)"


def load_yaml(text: str | bytes) -> Any:
    """Parse YAML safely, with libyaml's C parser when present (6x faster on a dvc.lock than pure Python)."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed (hashlib.file_digest)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def save_arrays(dest: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Atomically save named arrays as safetensors (no pickle).

    Byte-stable only with at most one metadata key (safetensors orders metadata by hash).
    """
    if metadata and len(metadata) > 1:
        raise ValueError("safetensors metadata with more than one key is not byte-stable")
    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    write_bytes(dest, save(contiguous, metadata=metadata))


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Load named arrays from a safetensors file."""
    return load_file(str(path))
