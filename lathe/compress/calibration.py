"""Calibration data for static INT8 quantization: which train images, and how they are fed.

The quantize stage calibrates on a seeded subset of the train split (`calibration_indices`), recorded
by id and hash (`calibration_ids_sha256`); `ImageReader` feeds those (N, S, S) uint8 images through
`lathe.measure.ort.to_input` in batches of CALIBRATION_BATCH (or the model's fixed batch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from lathe.errors import ConfigError, DataError
from lathe.io import sha256_bytes
from lathe.measure.ort import input_spec, load_session, to_input

CALIBRATION_SPLIT = "train"
# Images per calibrator.collect_data call: bounds memory (the calibrator keeps every intermediate
# tensor of a call) and fixes how histograms are merged, so it is part of the result. (1,1,S,S)..(32,1,S,S).
CALIBRATION_BATCH = 32


def calibration_indices(n_train: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct positions in a split of `n_train` samples, drawn with `seed`, sorted (int64)."""
    if size > n_train:
        raise ConfigError(f"quantize.calibration_size = {size} is larger than the {CALIBRATION_SPLIT} split "
                          f"({n_train} samples); lower it to at most {n_train}")
    if size < 1:
        raise ConfigError(f"quantize.calibration_size = {size}; need at least 1 sample")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_train, size=size, replace=False)).astype(np.int64)


def calibration_ids_sha256(sample_ids: Sequence[int] | np.ndarray) -> str:
    """sha256 of the canonical id list: the ids sorted ascending, unique, each in decimal followed by
    "\\n", UTF-8. Reproducible in a shell: `jq -r '.calibration.sample_ids[]' quantize.json | sha256sum`."""
    ids = sorted({int(i) for i in np.asarray(sample_ids).ravel().tolist()})
    return sha256_bytes("".join(f"{i}\n" for i in ids).encode("utf-8"))


class ImageReader(CalibrationDataReader):
    """Feeds (n, 1, S, S) float32 batches of the given (N, S, S) uint8 images, in order.

    `batch` is the model's fixed batch size if it has one; N must then be a multiple of it
    (padding would calibrate on blank images).
    """

    def __init__(self, input_name: str, images_uint8: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        if len(images_uint8) == 0:
            raise DataError("no calibration images")
        self.input_name, self.images, self.batch = input_name, images_uint8, batch
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.images), self.batch):
            yield {self.input_name: to_input(self.images[start : start + self.batch])}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self.batches()


class _Single(CalibrationDataReader):
    """A reader over one feed (one collect_data call per batch)."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self.feed: dict[str, np.ndarray] | None = feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed, self.feed = self.feed, None
        return feed


def reader_for(model_path: Path, images_uint8: np.ndarray) -> ImageReader:
    """An ImageReader with the model's input name and batch (fixed batch honoured, else CALIBRATION_BATCH)."""
    name, shape = input_spec(load_session(model_path, threads=1))
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    if fixed and len(images_uint8) % fixed:
        raise ConfigError(f"{model_path} has a fixed batch of {fixed} but {len(images_uint8)} calibration images "
                          f"were given; use a quantize.calibration_size that is a multiple of {fixed}")
    return ImageReader(name, images_uint8, fixed or CALIBRATION_BATCH)
