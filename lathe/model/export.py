"""Export torch models to a single self-contained ONNX file and check it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from lathe.io import write_bytes

if TYPE_CHECKING:  # torch is imported where it is used: the metadata helpers serve torch-free stages too
    from torch import nn

INPUT_NAME = "image"  # (N, 1, S, S) float32 in [0, 1]
OUTPUT_NAME = "logits"  # (N, num_classes) float32
OPSET = 20


def export_onnx(model: nn.Module, image_size: int, in_channels: int = 1, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize `model` to ONNX bytes: one file (no external data), dynamic batch axis."""
    import torch

    model.eval()
    example = torch.zeros(2, in_channels, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}}, opset_version=OPSET, external_data=False,
            dynamo=True, verbose=False, optimize=True,
        )
        proto = onnx.load(str(path))
    proto.producer_name, proto.producer_version = "lathe", "0.1"
    strip_source_metadata(proto)
    if metadata:
        set_metadata(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


# Per-node exporter metadata that describes the Python source rather than the model: stack traces hold
# absolute paths and line numbers (another checkout, e.g. a rebuild's temporary worktree, would export
# other bytes); `namespace` and `class_hierarchy` hold each module's Python path (lathe.model.arch.BasicBlock),
# so moving a class to another module would change every model's identity. The layer names
# (`name_scopes`) and the traced op (`fx_node`) stay: they depend on the model alone.
SOURCE_METADATA_KEYS = frozenset({"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy", "namespace"})


def strip_source_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node metadata about Python source (SOURCE_METADATA_KEYS), in place."""
    graphs = [proto.graph] + [f for f in proto.functions]
    for g in graphs:
        for node in g.node:
            kept = [(m.key, m.value) for m in node.metadata_props if m.key not in SOURCE_METADATA_KEYS]
            if len(kept) != len(node.metadata_props):
                del node.metadata_props[:]
                for k, v in kept:
                    node.metadata_props.add(key=k, value=v)


def write_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    """Make `props` the model's whole metadata_props, sorted by key for byte-stable files."""
    del proto.metadata_props[:]
    for k in sorted(props):
        proto.metadata_props.add(key=k, value=props[k])


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace/insert metadata_props entries, kept sorted for byte-stable files."""
    write_metadata(proto, {p.key: p.value for p in proto.metadata_props} | metadata)


def save_onnx(dest: Path, model_bytes: bytes) -> None:
    """Atomically write an ONNX model file."""
    write_bytes(dest, model_bytes)


def max_abs_diff_vs_torch(model: nn.Module, model_bytes: bytes, x: np.ndarray) -> float:
    """Largest |onnxruntime - torch| over the logits for input `x` (N, C, S, S) float32."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT_NAME: x})[0]
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    return float(np.abs(got - want).max())
