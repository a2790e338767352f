"""File I/O shared by every stage: atomic writes, hashes, arrays, JSON.

Writes go to a temp file in the destination folder and are moved in with `os.replace`, so a
killed process leaves the old file or none, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors.numpy import load_file, save

CHUNK = 1 << 20  # 1 MiB reads when hashing


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success it replaces `dest`, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


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


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


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
