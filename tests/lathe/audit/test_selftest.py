"""Hostile models and self-test files: refused by the static checks before anything runs, and, for what gets
past them (a trusted key signed it), confined: wall time, address space and file size limits in a child.

Issue 11's acceptance: malicious models and archives (endless loop, huge allocation, decompression bomb,
external data) are refused within 30 s each and 512 MB peak memory (archives: tests/lathe/ship/test_archive.py).
"""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lathe.audit.selftest import SandboxLimits, SelftestError, check_model_graph, read_selftest_headers, run_selftest
from lathe.audit.trust import resolve_trust
from lathe.audit.verify import verify_package
from lathe.ship.contract import Preprocessing, npz_bytes
from tests.packages import SIZE, TASK, build_package, make_keys, tiny_model


def endless_loop_model() -> onnx.ModelProto:
    """A Loop whose trip count is 2**62 and whose body adds 1 forever; the output is logits-shaped."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    nodes = [
        helper.make_node("Constant", [], ["trips"], value=helper.make_tensor("t", TensorProto.INT64, [], [2**62])),
        helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("Loop", ["trips", "cond", "zero"], ["acc"], body=body),
        helper.make_node("Flatten", ["image"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["m"]),
        helper.make_node("Add", ["m", "acc"], ["logits"]),
    ]
    return tiny_model(0, nodes)


def huge_allocation_model() -> onnx.ModelProto:
    """ConstantOfShape of 2**31 floats (8 GiB), reduced to a scalar and added to the logits."""
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [1], [2**31])),
        helper.make_node("ConstantOfShape", ["shape"], ["big"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=1),
        helper.make_node("Flatten", ["image"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["m"]),
        helper.make_node("Add", ["m", "total"], ["logits"]),
    ]
    return tiny_model(0, nodes)


def external_data_model() -> onnx.ModelProto:
    model = tiny_model(0)
    w = model.graph.initializer[0]
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    for k, v in (("location", "/etc/passwd"), ("offset", "0"), ("length", "256")):
        w.external_data.add(key=k, value=v)
    return model


def preprocessing() -> Preprocessing:
    from lathe.ship.card import preprocessing_record

    return Preprocessing.model_validate(preprocessing_record(tiny_model(0).SerializeToString(), TASK, 0.5))


def write_case(tmp_path: Path, model: onnx.ModelProto) -> tuple[Path, Path]:
    images = np.zeros((2, SIZE, SIZE), np.uint8)
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "selftest.npz").write_bytes(npz_bytes({"images": images, "logits": np.zeros((2, 4), np.float32)}))
    return tmp_path / "model.onnx", tmp_path / "selftest.npz"


# --- the static checks: refused before anything is loaded


@pytest.mark.parametrize("make, message", [
    (endless_loop_model, "uses op ai.onnx.Loop"),
    (huge_allocation_model, "uses op ai.onnx.ConstantOfShape"),
    (external_data_model, "external files"),
])
def test_a_signed_hostile_model_is_refused_by_the_graph_check(tmp_path, make, message):
    """Signed by a trusted key (an insider, a stolen key): still refused, fast, and the self-test never runs."""
    keys = make_keys(tmp_path / "keys")
    pkg = build_package(tmp_path / "p", keys["priv"], model=make(), expected=np.zeros((3, 4), np.float32))
    start = time.monotonic()
    report = verify_package(pkg, resolve_trust(pkg, keys["pub"]))
    assert time.monotonic() - start < 30
    bad = {c.name: c.message for c in report.checks if c.status == "FAIL"}
    assert set(bad) == {"model graph"} and message in bad["model graph"]
    assert report.status_of("self-test") == "SKIP"


def test_graph_check_accepts_the_tiny_classifier_and_refuses_a_shape_mismatch():
    pre = preprocessing()
    assert "ops Flatten, MatMul" in check_model_graph(tiny_model(0).SerializeToString(), pre)
    wide = tiny_model(0)
    wide.graph.input[0].type.tensor_type.shape.dim[2].dim_value = SIZE * 2
    with pytest.raises(SelftestError, match="does not match preprocessing.json"):
        check_model_graph(wide.SerializeToString(), pre)
    with pytest.raises(SelftestError, match="not a readable ONNX model"):
        check_model_graph(b"\x08garbage", pre)


def test_opsets_declared_but_unused_pass_and_a_node_of_another_domain_does_not():
    """onnxruntime's quant_pre_process declares ai.onnx.ml, com.microsoft, ... in every quantized
    model (the pipeline's INT8 packages); only nodes decide what runs."""
    from onnx import helper

    pre = preprocessing()
    declared = tiny_model(0)
    for domain, version in [("ai.onnx.ml", 5), ("com.microsoft", 1), ("com.microsoft.nchwc", 1), ("org.pytorch.aten", 1)]:
        declared.opset_import.append(helper.make_opsetid(domain, version))
    assert "ops Flatten, MatMul" in check_model_graph(declared.SerializeToString(), pre)
    custom = tiny_model(0)
    custom.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    custom.graph.node[0].domain = "com.microsoft"
    with pytest.raises(SelftestError, match="com.microsoft"):
        check_model_graph(custom.SerializeToString(), pre)
    newer = tiny_model(0)
    newer.opset_import[0].version = 99
    with pytest.raises(SelftestError, match="opset ai.onnx 99 is not allowed"):
        check_model_graph(newer.SerializeToString(), pre)


# --- selftest.npz headers


def _npz(members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, arr, allow_pickle=True)
    return out.getvalue()


def test_npz_decompression_bomb_is_refused_from_its_header(tmp_path):
    zeros = _npy(np.zeros((64 * 2**20,), np.uint8))  # 64 MiB of zeros, deflated to ~64 KiB
    (tmp_path / "s.npz").write_bytes(_npz({"images.npy": zeros}, zipfile.ZIP_DEFLATED))
    with pytest.raises(SelftestError, match="is compressed"):
        read_selftest_headers(tmp_path / "s.npz")


@pytest.mark.parametrize("members, message", [
    ({"images.npy": _npy(np.array([object()], dtype=object))}, "images is object; expected uint8"),
    ({"evil.npy": _npy(np.zeros(2, np.uint8))}, "unexpected member evil.npy"),
    ({"images.npy": _npy(np.zeros((2, 8, 8), np.uint8))[:200]}, "header says"),
    ({"images.npy": b"\x93NUMPY\x01\x00" + b"\xff\xff" + b"{" * 64}, "no valid .npy header"),
    ({"images.npy": _npy(np.zeros((2, 8, 8), np.uint8)), "logits.npy": _npy(np.zeros((3, 4), np.float32))},
     "2 images and 3 expected outputs"),
    ({"images.npy": _npy(np.zeros((2, 8, 8), np.uint8))}, "no logits array"),
])
def test_bad_selftest_files_are_refused_before_their_data_is_read(tmp_path, members, message):
    (tmp_path / "s.npz").write_bytes(_npz(members))
    with pytest.raises(SelftestError, match=message):
        read_selftest_headers(tmp_path / "s.npz")


def test_a_header_claiming_a_huge_array_is_refused(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 8, 8)})
    (tmp_path / "s.npz").write_bytes(_npz({"images.npy": buf.getvalue() + bytes(128)}))
    with pytest.raises(SelftestError, match=r"header says \(1000000000, 8, 8\) \(64000000000 bytes\)"):
        read_selftest_headers(tmp_path / "s.npz")


# --- the confinement itself (models that only a broken static check would let through)


def _run_confined(model: Path, st: Path, limits: SandboxLimits) -> tuple[str, float, int]:
    """run_selftest in a fresh process; (outcome line, seconds, peak RSS of the confined child in MB)."""
    code = ("import json, resource, sys, time; from pathlib import Path\n"
            "from lathe.audit.selftest import SandboxLimits, SelftestError, run_selftest\n"
            "from tests.lathe.audit.test_selftest import preprocessing\n"
            "t = time.monotonic()\n"
            "try: out = 'PASS ' + run_selftest(Path(sys.argv[1]), Path(sys.argv[2]), preprocessing(), "
            "SandboxLimits(**json.loads(sys.argv[3])))\n"
            "except SelftestError as e: out = 'FAIL ' + str(e)\n"
            "print(json.dumps([out, time.monotonic() - t, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024]))")
    res = subprocess.run([sys.executable, "-c", code, str(model), str(st),
                          json.dumps({"seconds": limits.seconds, "memory_bytes": limits.memory_bytes})],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[3])
    assert res.returncode == 0, res.stderr
    return tuple(json.loads(res.stdout.strip().splitlines()[-1]))


def test_an_endless_model_is_killed_at_the_default_wall_time_limit(tmp_path):
    limits = SandboxLimits()
    assert limits.seconds <= 30 and limits.memory_bytes <= 512 * 2**20
    outcome, seconds, peak_mb = _run_confined(*write_case(tmp_path, endless_loop_model()), limits)
    assert outcome.startswith("FAIL") and ("did not finish within" in outcome or "CPU-time" in outcome), outcome
    assert seconds < 30 and peak_mb < 512


def test_a_huge_allocation_fails_inside_the_memory_limit(tmp_path):
    outcome, seconds, peak_mb = _run_confined(*write_case(tmp_path, huge_allocation_model()), SandboxLimits())
    assert outcome.startswith("FAIL") and "memory limit (512 MB)" in outcome, outcome
    assert seconds < 30 and peak_mb < 512


def test_the_child_runs_isolated_from_the_working_directory(tmp_path, monkeypatch):
    """An unpacked archive that drops numpy.py where verify runs cannot get imported by the child."""
    (tmp_path / "numpy.py").write_text("raise SystemExit('shadowed')\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "case").mkdir()
    model, st = write_case(tmp_path / "case", tiny_model(0))
    from lathe.measure.ort import load_session, predict

    expected = predict(load_session(model, 1), np.zeros((2, SIZE, SIZE), np.uint8))
    st.write_bytes(npz_bytes({"images": np.zeros((2, SIZE, SIZE), np.uint8), "logits": expected}))
    assert "2/2 classes agree" in run_selftest(model, st, preprocessing())
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # the parent is untouched
