"""The package contract: schema, file names, stamp keys, and the byte-stable encodings every builder
and verifier shares (docs/package-format.md). One home for each of these facts."""

from __future__ import annotations

import copy
import io
import json
import re
import zipfile
from typing import Any, Literal, TypeVar

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lathe.data.contract import ResizePolicy
from lathe.errors import LatheError
from lathe.io import sha256_bytes
from lathe.measure.metrics import TIMING_KEYS
from lathe.model.export import write_metadata
from lathe.ship.params import TARGET_NAME, GateParams, SelectionPolicy
from lathe.ship.signing import SIGNATURE_FILE

M = TypeVar("M", bound=BaseModel)

SCHEMA = "lathe.package/2"
MODEL_FILE = "model.onnx"
PREPROCESSING_FILE = "preprocessing.json"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "model_card.md"
SELFTEST_FILE = "selftest.npz"
PACKAGE_ID_KEY = "lathe.package_id"
MANIFEST_SHA_KEY = "lathe.manifest_sha256"
STAMP_KEYS = (PACKAGE_ID_KEY, MANIFEST_SHA_KEY)
SELFTEST_ATOL = 1e-3  # logits; a device's onnxruntime build may differ in the last bits (int8 kernels more)


def unstamped_model_bytes(data: bytes) -> bytes:
    """The ONNX bytes with the `lathe.package_id` / `lathe.manifest_sha256` metadata entries removed.

    manifest.json's `files["model.onnx"]` is the sha256 of this (the stamp carries the manifest's
    hash, so the manifest cannot carry the stamped file's). Other metadata stays, sorted.
    """
    proto = onnx.load_from_string(data)
    props = {p.key: p.value for p in proto.metadata_props if p.key not in STAMP_KEYS}
    write_metadata(proto, props)
    return proto.SerializeToString(deterministic=True)


def stamp_model_bytes(data: bytes, package_id: str, manifest_sha256: str) -> bytes:
    """`data` with the two package entries set in metadata_props (sorted)."""
    proto = onnx.load_from_string(data)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({PACKAGE_ID_KEY: package_id, MANIFEST_SHA_KEY: manifest_sha256})
    write_metadata(proto, props)
    return proto.SerializeToString(deterministic=True)


def model_stamp(data: bytes) -> dict[str, str]:
    """The package entries of an ONNX file's metadata_props (empty when unstamped)."""
    proto = onnx.load_from_string(data)
    return {p.key: p.value for p in proto.metadata_props if p.key in STAMP_KEYS}


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII: the bytes the package id is computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_text(manifest: dict) -> str:
    """manifest.json as written: sorted keys, 2-space indent, trailing newline (as `lathe.io.write_json`)."""
    return json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"


# Manifest values measured on the build machine (latency, throughput, the machine itself): shown, gated
# and kept, but outside the package's identity (identity_view), so the same models rebuilt on another
# machine give the same package id, and `verify --rebuild` shows these side by side instead of failing on them.
MEASURED_GATES = ("max_latency_p50_ms",)
CARD_MEASURED_HEADER = "## Measured on the build machine (not part of the package identity)"
NOT_IDENTITY = ("package_id", "build")  # build: time, flow run id, machine


def identity_view(manifest: dict) -> dict:
    """The manifest without what is not its identity: NOT_IDENTITY, the measured values, what follows from
    them (a candidate's verdict on a measured gate, the chosen one's too, whether it passed every gate) and the
    model card's hash
    (its last section is measured; everything above it renders identity fields, and a rebuild compares
    that text byte for byte). The same models rebuilt on another machine have the same identity view."""
    body = copy.deepcopy({k: v for k, v in manifest.items() if k not in NOT_IDENTITY})
    metrics_test = (body.get("metrics") or {}).get("test")
    if isinstance(metrics_test, dict):
        for k in TIMING_KEYS:
            metrics_test.pop(k, None)
    if isinstance(body.get("files"), dict):
        body["files"].pop(CARD_FILE, None)
    for gate in body.get("gates") or []:
        if isinstance(gate, dict) and gate.get("gate") in MEASURED_GATES:
            gate.pop("value", None)
            # The chosen variant's verdict on it is a measurement too (since 2026-12-08 a variant missing the
            # latency gate on the build machine can ship). Held at true rather than dropped: before then the chosen
            # variant always passed it, so the ids of packages built earlier stay what they were.
            if "passed" in gate:
                gate["passed"] = True
    for row in body.get("selection") or []:
        if isinstance(row, dict):
            row.pop("latency_p50_ms", None)
            row.pop("passed", None)
            if isinstance(row.get("failed"), list):
                row["failed"] = [g for g in row["failed"] if g not in MEASURED_GATES]
    return body


def package_id_of(manifest: dict) -> str:
    """First 16 hex of sha256 over the canonical identity view of the manifest (no id, build record or
    measured values)."""
    return sha256_bytes(canonical_json(identity_view(manifest)))[:16]


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (np.load-able with allow_pickle=False) with fixed zip timestamps: byte-stable.

    np.savez stamps members with the current time, so two builds would differ.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            if arr.dtype == object:
                raise ValueError(f"{name}: object arrays would need pickle")
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# What a package may hold, and how much of it (a verifier checks these before reading further)

SIGNED_FILES = (MODEL_FILE, PREPROCESSING_FILE, CARD_FILE, SELFTEST_FILE)  # listed with their sha256 in the manifest
PACKAGE_FILES = (*SIGNED_FILES, MANIFEST_FILE, SIGNATURE_FILE)  # exactly these, nothing else
MAX_FILE_BYTES = {MODEL_FILE: 64 * 2**20, PREPROCESSING_FILE: 64 * 2**10, MANIFEST_FILE: 8 * 2**20,
                  CARD_FILE: 2**20, SELFTEST_FILE: 32 * 2**20, SIGNATURE_FILE: 256 * 2**10}
SELFTEST_ARRAYS = {"images": "uint8", "logits": "float32", "sample_ids": "int64", "labels": "int64"}
SELFTEST_MAX_SAMPLES = 4096
MAX_IR_VERSION = 13  # onnxruntime 1.31 loads up to this
MAX_OPSET = 23
# The ops a package model may use: plain, bounded tensor ops (what torch's exporter and onnxruntime's
# QDQ quantizer produce for these CNNs, and their near relatives). Control flow, subgraphs,
# sequences, random numbers and shape-driven allocation (ConstantOfShape, Expand, Tile, Range,
# Resize, Pad) are refused before anything runs.
MODEL_OPS = frozenset({
    "Abs", "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "Conv", "DequantizeLinear",
    "Div", "Dropout", "Erf", "Exp", "Flatten", "Gather", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool",
    "HardSigmoid", "HardSwish", "Identity", "LayerNormalization", "LeakyRelu", "LogSoftmax", "MatMul", "Max",
    "MaxPool", "Mean", "Min", "Mul", "Neg", "PRelu", "QuantizeLinear", "ReduceMax", "ReduceMean", "Relu", "Reshape",
    "Shape", "Sigmoid", "Slice", "Softmax", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Transpose", "Unsqueeze",
})


# ---------------------------------------------------------------------------------------------
# Schemas of what verify and trace read: preprocessing.json (all of it) and the manifest's keys
# they rely on. Values from a package are bounded here, so nothing absurd reaches a device or a report.

HEX64 = r"^[0-9a-f]{64}$"
VARIANT = r"^[a-z0-9_]+(/[a-z0-9_]+){0,3}$"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class _Open(_Record):
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False, strict=True)


class InputSpec(_Record):
    name: str = Field(min_length=1, max_length=128)
    shape: list[int | str | None] = Field(min_length=4, max_length=4, description="(batch, C, H, W)")
    dtype: Literal["float32"]
    layout: Literal["NCHW"]

    @model_validator(mode="after")
    def _dims(self) -> InputSpec:
        if not all(isinstance(d, int) and 1 <= d <= 4096 for d in self.shape[1:]):
            raise ValueError(f"channels, height and width must be integers in [1, 4096], got {self.shape[1:]}")
        return self


class OutputSpec(_Record):
    name: str = Field(min_length=1, max_length=128)
    kind: Literal["logits"]
    shape: list[int | str | None] = Field(min_length=2, max_length=2, description="(batch, classes)")


class ResizeSpec(_Record):
    size: list[int] = Field(min_length=2, max_length=2)
    method: str = Field(max_length=200)
    policy: ResizePolicy


class NormaliseSpec(_Record):
    divide_by: float = Field(ge=1, le=65535, description="source pixels are divided by this (255 for 8-bit)")
    mean: float = Field(ge=-1000, le=1000)
    std: float = Field(ge=1e-6, le=1000)
    rule: str = Field(max_length=200)


class DecisionSpec(_Record):
    p_defective: str = Field(max_length=200)
    threshold: float = Field(ge=0, le=1)
    rule: str = Field(max_length=200)


class SelftestSpec(_Record):
    file: Literal["selftest.npz"]
    inputs: Literal["images"]
    outputs: Literal["logits"]
    atol: float = Field(gt=0, le=1)


class Preprocessing(_Record):
    """preprocessing.json: how a device turns a source image into the model's input, and the decision."""

    input: InputSpec
    output: OutputSpec
    source_image: dict[str, str | int]
    resize: ResizeSpec
    normalise: NormaliseSpec
    class_names: list[str] = Field(min_length=2, max_length=256)
    defective_classes: list[str] = Field(min_length=1, max_length=255, description="class names judged a defect")
    decision: DecisionSpec
    selftest: SelftestSpec

    @model_validator(mode="after")
    def _consistent(self) -> Preprocessing:
        k = len(self.class_names)
        if self.output.shape[1] != k:
            raise ValueError(f"output has {self.output.shape[1]} classes but class_names lists {k}")
        unknown = [c for c in self.defective_classes if c not in self.class_names]
        if unknown:
            raise ValueError(f"defective_classes {unknown} are not among class_names")
        if len(set(self.defective_classes)) >= k:
            raise ValueError("defective_classes name every class: none is left as good")
        if self.input.shape[1] != self.source_image.get("channels"):
            raise ValueError(f"source_image.channels {self.source_image.get('channels')} does not match the input's "
                             f"{self.input.shape[1]}")
        if self.resize.size != self.input.shape[2:]:
            raise ValueError(f"resize.size {self.resize.size} does not match the input's {self.input.shape[2:]}")
        if len(set(self.class_names)) != k or not all(0 < len(c) <= 100 for c in self.class_names):
            raise ValueError("class_names must be distinct, 1 to 100 characters each")
        return self


class TargetRecord(_Open):
    name: str = Field(pattern=TARGET_NAME)
    selection: SelectionPolicy | None = None  # absent in packages built before selection policies


class SelectionRow(_Open):
    """One evaluated candidate as manifest.selection lists it (lathe.ship.gates.selection_row)."""

    variant: str = Field(pattern=VARIANT)
    passed: bool
    size_bytes: int = Field(ge=0)
    latency_p50_ms: float = Field(ge=0, le=1e7)
    accuracy: float | None = Field(None, ge=0, le=1)  # absent in packages built before selection policies
    failed: list[str] = Field(max_length=len(GateParams.model_fields))

    @model_validator(mode="after")
    def _gate_names(self) -> SelectionRow:
        unknown = [g for g in self.failed if g not in GateParams.model_fields]
        if unknown:
            raise ValueError(f"failed lists {len(unknown)} name(s) that are not gates")
        return self


class GitRecord(_Open):
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    dirty: bool


class BuildRecord(_Open):
    time: str = Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
    flow_run_id: str | None = Field(max_length=100)


class PathHash(_Record):
    path: str = Field(max_length=500)
    md5: str | None = Field(pattern=r"^[0-9a-f]{32}(\.dir)?$")


class StageRecord(_Record):
    cmd: str | list[str]
    deps: list[PathHash]
    outs: list[PathHash]
    params: dict[str, Any]


class RawDataRecord(_Open):
    path: str = Field(max_length=500)
    md5: str = Field(pattern=r"^[0-9a-f]{32}(\.dir)?$")
    files: int | None = Field(ge=0)
    samples: int = Field(ge=0)
    class_counts: dict[str, int]


class ValidationRecord(_Open):
    success: bool
    sha256: str = Field(pattern=HEX64)
    summary: str = Field(max_length=500)


class GateRecord(_Open):
    gate: str = Field(max_length=100)
    limit: float | int | None
    value: float | int | None
    passed: bool


class Manifest(_Open):
    """The manifest keys verify and trace rely on (the rest is kept as written)."""

    schema_: Literal["lathe.package/2"] = Field(alias="schema")
    package_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    target: TargetRecord
    variant: str = Field(pattern=VARIANT)
    files: dict[str, str]
    git: GitRecord
    build: BuildRecord
    stages: dict[str, StageRecord]
    chain: list[str]
    raw_data: RawDataRecord
    validation: ValidationRecord
    metrics: dict[str, Any]
    gates: list[GateRecord]
    selection: list[SelectionRow] | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _files(self) -> Manifest:
        if sorted(self.files) != sorted(SIGNED_FILES):
            raise ValueError(f"files must list exactly {', '.join(SIGNED_FILES)}")
        if not all(re.fullmatch(HEX64, h) for h in self.files.values()):
            raise ValueError("files must map each name to a sha256 (64 lowercase hex digits)")
        return self


def schema_problem(file: str, exc: ValidationError) -> str:
    """One line naming the file, the key and what was expected, for the first problem of `exc`."""
    from lathe.io import printable

    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    got = f" (got {printable(repr(err['input']), 60)})" if err["type"] != "missing" and "input" in err else ""
    more = f"; {len(exc.errors()) - 1} more problem(s)" if len(exc.errors()) > 1 else ""
    return f"{file}: {key}: {err['msg']}{got}{more}"


def parse_json_file(data: bytes, file: str, model: type[M]) -> M:
    """Validate a package's JSON file against `model` (NaN and Infinity refused); SchemaError names file and key."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise SchemaError(schema_problem(file, exc)) from None


class SchemaError(LatheError):
    """A package file does not follow the contract; the message names the file and key."""
