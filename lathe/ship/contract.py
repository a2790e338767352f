"""The package contract: schema, file names, stamp keys, and the byte-stable encodings every builder
and verifier shares (docs/package-format.md). One home for each of these facts."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np
import onnx

from lathe.export import write_metadata
from lathe.io import sha256_bytes

SCHEMA = "lathe.package/1"
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


def package_id_of(manifest: dict) -> str:
    """First 16 hex of sha256 over the canonical manifest without `package_id` and `build`."""
    body = {k: v for k, v in manifest.items() if k not in ("package_id", "build")}
    return sha256_bytes(canonical_json(body))[:16]


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
