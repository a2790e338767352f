"""Signed packages made by the package code's own rules, for the audit tests (no trained model, no DVC run).

`build_package` writes a valid lathe.package/2 folder: a tiny hand-made ONNX classifier, the real
preprocessing record, a self-test from onnxruntime, a manifest with its package id, the model
stamped with the manifest's hash, signed with model-signing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lathe.data.contract import Task
from lathe.io import sha256_bytes, sha256_file, write_json
from lathe.ship.card import preprocessing_record
from lathe.ship.contract import npz_bytes, package_id_of, stamp_model_bytes, unstamped_model_bytes
from lathe.ship.signing import generate_keys, sign_package

SIZE = 8  # px: the tiny model's input side
TASK = Task(classes=["functional", "possibly_defective", "probably_defective", "defective"],
            defective=["probably_defective", "defective"], image_size=SIZE)


def tiny_model(seed: int, nodes: list | None = None) -> onnx.ModelProto:
    """(N, 1, S, S) float `image` -> Flatten -> MatMul -> (N, 4) `logits` (or the given nodes)."""
    w = np.random.default_rng(seed).normal(size=(SIZE * SIZE, 4)).astype(np.float32)
    graph = helper.make_graph(
        nodes or [helper.make_node("Flatten", ["image"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def make_keys(root: Path, name: str = "k") -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    generate_keys(root / f"{name}.pem", root / f"{name}.pub")
    return {"priv": root / f"{name}.pem", "pub": root / f"{name}.pub"}


def build_package(dest: Path, private_key: Path, seed: int = 0, target: str = "edge",
                  raw_md5: str = "a" * 32 + ".dir", commit: str = "0" * 40, model: onnx.ModelProto | None = None,
                  expected: np.ndarray | None = None, build_time: str = "2024-01-01T00:00:00Z") -> Path:
    """A valid lathe.package/2 folder `dest/<target>`: model stamped with the manifest hash, signed.

    `model` replaces the tiny classifier (a hostile one, say); `expected` then gives the self-test's
    expected logits (else onnxruntime computes them here).
    """
    from lathe.measure.ort import load_session, predict

    pkg = dest / target
    pkg.mkdir(parents=True)
    unstamped = unstamped_model_bytes((model or tiny_model(seed)).SerializeToString())
    images = np.random.default_rng(seed).integers(0, 256, size=(3, SIZE, SIZE), dtype=np.uint8)
    if expected is None:
        (pkg / "model.onnx").write_bytes(unstamped)
        expected = predict(load_session(pkg / "model.onnx", 1), images)
    (pkg / "selftest.npz").write_bytes(npz_bytes({"images": images, "logits": expected.astype(np.float32)}))
    write_json(pkg / "preprocessing.json", preprocessing_record(unstamped, TASK, 0.5))
    (pkg / "model_card.md").write_text(f"# model card {seed}\n")
    manifest = {
        "schema": "lathe.package/2", "target": {"name": target, "selection": "smallest"},
        "variant": "quantized/student",
        "files": {"model.onnx": sha256_bytes(unstamped),
                  **{n: sha256_file(pkg / n) for n in ("preprocessing.json", "model_card.md", "selftest.npz")}},
        "source_model_sha256": sha256_bytes(unstamped),
        "git": {"commit": commit, "dirty": False, "dirty_allowed": False},
        "stages": {"ingest": {"cmd": "python -m stages.ingest", "deps": [{"path": "data/raw", "md5": raw_md5}],
                              "outs": [{"path": "data/prepared", "md5": "b" * 32 + ".dir"}], "params": {}},
                   "quantize@student": {"cmd": "q", "deps": [], "outs": [{"path": "models/quantized/student",
                                                                         "md5": "c" * 32 + ".dir"}], "params": {}}},
        "chain": ["data/raw", "ingest", "quantize@student", f"package@{target}"],
        "raw_data": {"path": "data/raw", "md5": raw_md5, "files": 49, "samples": 48,
                     "class_counts": {c: 12 for c in TASK.classes}},
        "validation": {"success": True, "sha256": "d" * 64, "summary": "12/12 expectations met"},
        "calibration": None, "params": {"ingest": {"image_size": SIZE}},
        "libraries": {"onnx": onnx.__version__},
        "metrics": {"test": {"accuracy": 0.5, "latency_p50_ms": 1.0}, "threshold": {"value": 0.5, "chosen_on": "val",
                                                              "test": {"defective_recall": 0.9, "false_reject_rate": 0.2}}},
        "gates": [{"gate": "max_size_bytes", "limit": 500000, "value": 300, "passed": True}],
        "selection": [{"variant": "teacher", "passed": False, "size_bytes": 900000, "latency_p50_ms": 2.0,
                       "accuracy": 0.6, "failed": ["max_size_bytes"]},
                      {"variant": "quantized/student", "passed": True, "size_bytes": 300, "latency_p50_ms": 1.0,
                       "accuracy": 0.5, "failed": []},
                      {"variant": "student", "passed": True, "size_bytes": 900, "latency_p50_ms": 0.5,
                       "accuracy": 0.55, "failed": []}],
        "build": {"time": build_time, "flow_run_id": None},
    }
    manifest["package_id"] = package_id_of(manifest)
    write_json(pkg / "manifest.json", manifest)
    (pkg / "model.onnx").write_bytes(stamp_model_bytes(unstamped, manifest["package_id"],
                                                       sha256_file(pkg / "manifest.json")))
    sign_package(pkg, private_key)
    return pkg


def reseal(pkg: Path, private_key: Path) -> None:
    """After editing a package's files: record their hashes, recompute the package id, restamp the model
    and sign again, as a builder holding `private_key` would (an insider's or a stolen key)."""
    import json

    manifest = json.loads((pkg / "manifest.json").read_text())
    model = (pkg / "model.onnx").read_bytes()
    unstamped = unstamped_model_bytes(model)
    manifest["files"] = {"model.onnx": sha256_bytes(unstamped),
                         **{n: sha256_file(pkg / n) for n in ("preprocessing.json", "model_card.md", "selftest.npz")}}
    manifest["package_id"] = package_id_of(manifest)
    write_json(pkg / "manifest.json", manifest)
    (pkg / "model.onnx").write_bytes(stamp_model_bytes(unstamped, manifest["package_id"],
                                                       sha256_file(pkg / "manifest.json")))
    sign_package(pkg, private_key)
