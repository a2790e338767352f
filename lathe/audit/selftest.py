"""The package self-test, run as a hostile input is run: checked first, then confined.

1. `read_selftest_headers`: selftest.npz is opened as a zip and every member's .npy header is read
   and checked (name, dtype, shape, stored uncompressed, exact size) before any array data is read:
   no object arrays, no decompression, nothing larger than the limits.
2. `check_model_graph`: model.onnx is parsed (never run) and refused unless it is a plain feed-forward
   graph: only the ops in lathe.ship.contract.MODEL_OPS, no control flow or subgraphs, no functions,
   no external data, one float input whose shape matches preprocessing.json.
3. `run_selftest`: the golden inputs go through onnxruntime in a child process (`python -m
   lathe.audit.selftest_child`) with an address-space, CPU-time, file-size and wall-time limit; a model
   that loops or allocates without bound is killed and reported in one line.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lathe.errors import LatheError
from lathe.io import printable
from lathe.ship.contract import (
    MAX_FILE_BYTES,
    MAX_IR_VERSION,
    MAX_OPSET,
    MODEL_OPS,
    SELFTEST_ARRAYS,
    SELFTEST_FILE,
    SELFTEST_MAX_SAMPLES,
    Preprocessing,
)

MAX_NPY_HEADER = 4096  # bytes; numpy writes ~128


class SelftestError(LatheError):
    """The self-test file or the model cannot be run safely, or the run failed."""


@dataclass(frozen=True)
class SandboxLimits:
    seconds: float = 20.0  # wall time of the child, start-up included
    memory_bytes: int = 512 * 1024 * 1024  # address space of the child (RLIMIT_AS)
    write_bytes: int = 1024 * 1024  # largest file the child may write (RLIMIT_FSIZE)


# ---------------------------------------------------------------------------------------------
# 1. selftest.npz headers


def read_selftest_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} of a selftest.npz, checked member by member before any data is read."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES[SELFTEST_FILE]:
        raise SelftestError(f"{SELFTEST_FILE}: {size} bytes > limit {MAX_FILE_BYTES[SELFTEST_FILE]}")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > len(SELFTEST_ARRAYS):
                raise SelftestError(f"{SELFTEST_FILE}: {len(infos)} members; expected at most {len(SELFTEST_ARRAYS)}")
            out = {}
            for info in infos:
                name, spec = _member_header(zf, info)
                if name in out:
                    raise SelftestError(f"{SELFTEST_FILE}: member {name}.npy appears twice")
                out[name] = spec
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise SelftestError(f"{SELFTEST_FILE}: not a readable .npz ({type(exc).__name__}: {exc})") from None
    _check_shapes(out)
    return out


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[str, tuple[tuple[int, ...], np.dtype]]:
    shown = printable(info.filename)
    name = info.filename.removesuffix(".npy")
    if not info.filename.endswith(".npy") or name not in SELFTEST_ARRAYS:
        raise SelftestError(f"{SELFTEST_FILE}: unexpected member {shown} (expected {', '.join(SELFTEST_ARRAYS)})")
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise SelftestError(f"{SELFTEST_FILE}: member {shown} is compressed; a self-test file is stored as is")
    if info.file_size > MAX_FILE_BYTES[SELFTEST_FILE]:
        raise SelftestError(f"{SELFTEST_FILE}: member {shown} claims {info.file_size} bytes")
    with zf.open(info) as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=MAX_NPY_HEADER)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=MAX_NPY_HEADER)
            else:
                raise ValueError(f"npy format version {version}")
        except (ValueError, SyntaxError, TypeError) as exc:
            raise SelftestError(f"{SELFTEST_FILE}: member {shown} has no valid .npy header ({exc})") from None
        header_len = fh.tell()
    want = np.dtype(SELFTEST_ARRAYS[name])
    if dtype.hasobject or dtype != want or fortran:
        raise SelftestError(f"{SELFTEST_FILE}: {name} is {dtype}{' (Fortran order)' if fortran else ''}; expected {want}")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise SelftestError(f"{SELFTEST_FILE}: {name} has an invalid shape {shape}")
    nbytes = math.prod(shape) * dtype.itemsize
    if header_len + nbytes != info.file_size:
        raise SelftestError(f"{SELFTEST_FILE}: {name} header says {shape} ({nbytes} bytes) but the member holds "
                            f"{info.file_size - header_len}")
    return name, (tuple(shape), dtype)


def _check_shapes(specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    for required in ("images", "logits"):
        if required not in specs:
            raise SelftestError(f"{SELFTEST_FILE}: no {required} array")
    images, logits = specs["images"][0], specs["logits"][0]
    n = images[0] if images else 0
    if len(images) not in (3, 4) or len(logits) != 2:
        raise SelftestError(f"{SELFTEST_FILE}: images {images} / logits {logits}: expected (N, S, S) or "
                            "(N, C, S, S) and (N, K)")
    if not 1 <= n <= SELFTEST_MAX_SAMPLES or logits[0] != n:
        raise SelftestError(f"{SELFTEST_FILE}: {n} images and {logits[0]} expected outputs; "
                            f"expected the same count, 1 to {SELFTEST_MAX_SAMPLES}")
    for other in ("sample_ids", "labels"):
        if other in specs and specs[other][0] != (n,):
            raise SelftestError(f"{SELFTEST_FILE}: {other} has shape {specs[other][0]}, expected ({n},)")


# ---------------------------------------------------------------------------------------------
# 2. model.onnx, statically


def check_model_graph(data: bytes, pre: Preprocessing) -> str:
    """Refuse anything but a plain feed-forward classifier matching `pre`; return a one-line summary."""
    import onnx

    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise SelftestError(f"not a readable ONNX model ({type(exc).__name__})") from None
    if proto.ir_version > MAX_IR_VERSION:
        raise SelftestError(f"ir_version {proto.ir_version} > {MAX_IR_VERSION}")
    # Only the default domain's opset matters: every node must be a default-domain op of MODEL_OPS
    # (below). Other domains may be declared but never used: onnxruntime's quant_pre_process declares
    # eight of them (ai.onnx.ml, com.microsoft, ...) in every quantized model.
    if len(proto.opset_import) > 16:
        raise SelftestError(f"declares {len(proto.opset_import)} opsets (at most 16)")
    for imp in proto.opset_import:
        limit = MAX_OPSET if imp.domain in ("", "ai.onnx") else 1000
        if not 1 <= imp.version <= limit:
            raise SelftestError(f"opset {printable(imp.domain, 100) or 'ai.onnx'} {imp.version} is not allowed")
    if len(proto.functions):
        raise SelftestError(f"defines {len(proto.functions)} local functions; a package model may not")
    graph = proto.graph
    ops: set[str] = set()
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in MODEL_OPS:
            raise SelftestError(f"node {node.name!r} uses op {node.domain or 'ai.onnx'}.{node.op_type}, which a "
                                "package model may not (control flow, custom and unbounded ops are refused)")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise SelftestError(f"node {node.name!r} carries a subgraph")
        ops.add(node.op_type)
    tensors = list(graph.initializer) + [a.t for n in graph.node for a in n.attribute
                                         if a.type == onnx.AttributeProto.TENSOR]
    if any(t.data_location == onnx.TensorProto.EXTERNAL or t.external_data for t in tensors):
        raise SelftestError("keeps tensor data in external files; a package model must be self-contained")
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise SelftestError(f"has {len(inputs)} inputs and {len(graph.output)} outputs; expected one of each")
    inp = inputs[0]
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise SelftestError(f"input {inp.name!r} is not float32")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if inp.name != pre.input.name or len(dims) != 4 or dims[1:] != pre.input.shape[1:]:
        raise SelftestError(f"input {inp.name!r} {dims} does not match preprocessing.json "
                            f"({pre.input.name!r} {pre.input.shape})")
    return f"{len(graph.node)} nodes, ops {', '.join(sorted(ops))}"


# ---------------------------------------------------------------------------------------------
# 3. the run, confined


def _confine(limits: SandboxLimits) -> None:
    """In the child, before exec: hard limits the model cannot lift."""
    mem = int(limits.memory_bytes)
    cpu = int(math.ceil(limits.seconds)) + 1
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.write_bytes, limits.write_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _child_env() -> dict[str, str]:
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    return {**keep, "OMP_NUM_THREADS": "1", "ORT_DISABLE_TELEMETRY": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def run_selftest(model: Path, selftest: Path, pre: Preprocessing, limits: SandboxLimits = SandboxLimits()) -> str:
    """Run the golden inputs through `model` in a confined child; return a one-line PASS message.

    Raises SelftestError (one line) when the child is killed by a limit, fails, or its outputs
    differ from the expected ones by more than preprocessing.json's `selftest.atol`.
    """
    job = json.dumps({"model": str(model), "selftest": str(selftest), "atol": pre.selftest.atol,
                      "divide_by": pre.normalise.divide_by, "mean": pre.normalise.mean, "std": pre.normalise.std,
                      "channels": pre.input.shape[1]})
    # -I: isolated (no cwd or PYTHON* variables on the import path: an unpacked archive cannot shadow a module)
    with tempfile.TemporaryDirectory(prefix="lathe-selftest-") as cwd:
        proc = subprocess.Popen([sys.executable, "-I", "-m", "lathe.audit.selftest_child", job], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env(),
                                start_new_session=True, preexec_fn=lambda: _confine(limits))
        return _collect(proc, limits)


def _collect(proc: subprocess.Popen, limits: SandboxLimits) -> str:
    """Wait for the child (killing its whole process group at the deadline) and read its verdict."""
    try:
        out, err = proc.communicate(timeout=limits.seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise SelftestError(f"the model did not finish within {limits.seconds:g} s; killed") from None
    lines = out.decode("utf-8", "replace").strip().splitlines()
    result = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = None
    if proc.returncode != 0 or not isinstance(result, dict):
        raise SelftestError(_why_child_failed(proc.returncode, err.decode("utf-8", "replace"), limits))
    if not result.get("ok"):
        raise SelftestError(str(result.get("message", "failed")))
    return str(result["message"])


def _why_child_failed(code: int, stderr: str, limits: SandboxLimits) -> str:
    from lathe.io import printable

    tail = printable(stderr.strip().splitlines()[-1] if stderr.strip() else "", 160)
    if code == -signal.SIGXCPU or code == -signal.SIGKILL:
        return f"the model used more than its CPU-time limit ({limits.seconds:g} s); killed"
    if "MemoryError" in stderr or "bad_alloc" in stderr or "allocat" in stderr.lower():
        return f"the model needed more than its memory limit ({limits.memory_bytes // 2**20} MB); stopped ({tail})"
    return f"the self-test process failed (exit {code}): {tail or 'no message'}"
