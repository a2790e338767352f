"""The one result shape of prune, lowrank and distill: a source model folder in, a `Compressed` out.

Each compression trains (or fine-tunes) a network and keeps a record of what it did; the folder it
writes is the model folder every later stage reads (lathe.model.teacher.write_model_dir) plus that
record as <RECORD> (prune.json, lowrank.json, distill.json). Quantization is the exception by design:
it works on the ONNX graph, not on a torch network (lathe.compress.quantize).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from lathe.io import write_json
from lathe.model.params import ArchSpec, LiteSpec
from lathe.model.teacher import write_model_dir
from lathe.model.train import TrainResult


@dataclass
class Compressed:
    """A compressed, trained network and the record of how it was made."""

    model: nn.Module
    spec: ArchSpec | LiteSpec
    image_size: int
    fit: TrainResult  # the training that produced the kept weights (for pruning: every round's epochs)
    record: dict  # the content of record_file
    record_file: str  # prune.json | lowrank.json | distill.json, beside the model folder's files


def write_compressed(out_dir: Path, result: Compressed, check_images: np.ndarray) -> dict:
    """Write the model folder (weights, arch, ONNX checked against torch, train.json) plus the record; returns it."""
    write_model_dir(out_dir, result.model, result.spec, result.image_size, result.fit, check_images)
    write_json(Path(out_dir) / result.record_file, result.record)
    return result.record
