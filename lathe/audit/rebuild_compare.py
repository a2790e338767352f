"""Rebuild archaeology, the comparison: what differs between a package and its rebuild (lathe.audit.rebuild),
file by file and manifest key by key, with measured values (latency, the build machine) set apart, and
whether a rebuild that cannot be byte-identical is equivalent. Reads two folders or archives; runs nothing."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from lathe.audit.report import _short
from lathe.compress.quant_inspect import QDQ_OPS
from lathe.io import sha256_bytes
from lathe.ship.contract import (
    CARD_FILE,
    CARD_MEASURED_HEADER,
    MANIFEST_FILE,
    MODEL_FILE,
    PREPROCESSING_FILE,
    SELFTEST_FILE,
    SIGNATURE_FILE,
    identity_view,
    unstamped_model_bytes,
)

# ops that make a graph an INT8 one (onnxruntime runs them in integer kernels)
INT8_OPS = frozenset({*QDQ_OPS, "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"})


def json_diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Key paths (dotted, list items as [i]) where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in a:
                out.append(f"{p} (only in rebuilt)")
            elif k not in b:
                out.append(f"{p} (only in original)")
            else:
                out.extend(json_diff(a[k], b[k], p))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path or '<root>'} (length {len(a)} vs {len(b)})"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(json_diff(x, y, f"{path}[{i}]"))
        return out
    return [] if a == b and type(a) is type(b) else [path or "<root>"]


@dataclass
class Comparison:
    """What differs between an original and a rebuilt package: `diffs` fail the rebuild; `measured`
    (latency, the build machine) are shown side by side; `follows` are files whose bytes differ only
    because of those (the model's stamp carries the manifest's hash)."""

    diffs: list[str]
    measured: list[str]
    follows: set[str]


def _measured_card_part(text: str) -> tuple[str, str]:
    head, sep, tail = text.partition(CARD_MEASURED_HEADER)
    return head, (sep + tail if sep else "")


def _compare_manifests(a: bytes, b: bytes) -> tuple[list[str], list[str]]:
    """(identity key paths that differ, 'path: original vs rebuilt' lines for the measured ones): a key path
    is identity when it differs between the identity views (lathe.ship.contract.identity_view), measured
    when it differs only in the full manifests."""
    try:
        ma, mb = json.loads(a), json.loads(b)
    except json.JSONDecodeError:
        return ["formatting only"], []
    diffs = json_diff(identity_view(ma), identity_view(mb))
    identity = {p.split(" (", 1)[0] for p in diffs}  # json_diff marks a key on one side only with " (only in ...)"
    keys = [p.split(" (", 1)[0] for p in json_diff(ma, mb)]
    side = [f"{p}: {_at(ma, p)} (original) vs {_at(mb, p)} (rebuilt)" for p in keys
            if p not in identity and p != "package_id"]
    return diffs, side


def _at(obj: Any, path: str) -> str:
    """The value at a json_diff path, compact (a dict as JSON). A key may hold dots (files.model_card.md):
    at each level the longest key the path continues with is taken."""
    cur, rest = obj, path
    try:
        while rest:
            if rest.startswith("["):
                index, _, rest = rest[1:].partition("]")
                cur, rest = cur[int(index)], rest.removeprefix(".")
                continue
            key = max((k for k in cur if rest == k or rest.startswith((f"{k}.", f"{k}["))), key=len)
            cur, rest = cur[key], rest[len(key):].removeprefix(".")
    except (KeyError, IndexError, TypeError, ValueError):  # ValueError: max() of no key
        return "(absent)"
    return json.dumps(cur, sort_keys=True) if isinstance(cur, (dict, list)) else str(cur)


def _other_choice(original: Path, rebuilt: Path) -> str:
    """Why the rebuilt package holds another variant: said first, as it explains every other difference."""
    ma, mb = (json.loads(p.read_bytes()) for p in (original, rebuilt))
    policy = _at(ma, "target.selection")
    why = " (policy fastest ranks by latency, and this rebuild measured it again)" if policy == "fastest" else ""
    return f"the rebuild chose {_at(mb, 'variant')} where the package holds {_at(ma, 'variant')}{why}"


def compare_packages(original: Path, rebuilt: Path) -> Comparison:
    """Files (other than `signature`) that differ between two package folders; manifest.json by key
    path. Measured values (outside lathe.ship.contract.identity_view, the model card's last section) are
    listed apart; the model is compared without its stamp when the manifests differ only in those."""
    names = sorted(({p.name for p in original.iterdir()} | {p.name for p in rebuilt.iterdir()}) - {SIGNATURE_FILE})
    result = Comparison([], [], set())
    differing: dict[str, tuple[bytes, bytes]] = {}
    for name in names:
        a, b = original / name, rebuilt / name
        if not a.exists():
            result.diffs.append(f"{name}: only in the rebuilt package")
        elif not b.exists():
            result.diffs.append(f"{name}: missing from the rebuilt package")
        elif a.read_bytes() != b.read_bytes():
            differing[name] = (a.read_bytes(), b.read_bytes())
    if MANIFEST_FILE in differing:
        keys, side = _compare_manifests(*differing.pop(MANIFEST_FILE))
        result.measured += side
        if "variant" in keys:
            result.diffs.append(_other_choice(original / MANIFEST_FILE, rebuilt / MANIFEST_FILE))
        if keys:
            result.diffs.append(f"{MANIFEST_FILE}: differs at {', '.join(keys)}")
        else:
            result.follows.add(MANIFEST_FILE)
    if CARD_FILE in differing:
        (ha, ta), (hb, tb) = (_measured_card_part(x.decode("utf-8", "replace")) for x in differing.pop(CARD_FILE))
        if ha != hb:
            result.diffs.append(f"{CARD_FILE}: differs before its measured section")
        else:
            result.follows.add(CARD_FILE)
            result.measured.append(f"{CARD_FILE} measured section: original {_oneline(ta)!r} vs rebuilt {_oneline(tb)!r}")
    if MODEL_FILE in differing:
        ma, mb = differing.pop(MODEL_FILE)
        if unstamped_model_bytes(ma) == unstamped_model_bytes(mb) and MANIFEST_FILE in result.follows:
            result.follows.add(MODEL_FILE)  # same model; the stamp holds the (measurement-only) different manifest hash
        else:
            result.diffs.append(f"{MODEL_FILE}: sha256 {_short(sha256_bytes(ma))}… vs rebuilt {_short(sha256_bytes(mb))}…")
    for name, (da, db) in sorted(differing.items()):
        result.diffs.append(f"{name}: sha256 {_short(sha256_bytes(da))}… vs rebuilt {_short(sha256_bytes(db))}…")
    return result


def is_float_package(pkg: Path) -> bool:
    """Whether the package ships a float model: no INT8 calibration recorded and no quantize, dequantize or
    integer op in its graph (a quantization-aware model records no calibration: its ranges were learned in
    training). INT8 models give the same logits on every x86-64 machine with the pins (integer kernels,
    README "Determinism"); float ones do not. Runs after verify's checks passed (the files are in limits)."""
    try:
        if json.loads((pkg / MANIFEST_FILE).read_text()).get("calibration") is not None:
            return False
        graph = onnx.load_from_string((pkg / MODEL_FILE).read_bytes()).graph
        return not any(node.op_type in INT8_OPS for node in graph.node)
    except Exception:  # noqa: BLE001 - a manifest or model that does not parse is not known to be float
        return False


def same_model(original: Path, rebuilt: Path) -> bool:
    """The two packages' model.onnx without the stamp are the same bytes."""
    try:
        a, b = ((p / MODEL_FILE).read_bytes() for p in (original, rebuilt))
        return unstamped_model_bytes(a) == unstamped_model_bytes(b)
    except Exception:  # noqa: BLE001 - a file that does not read or parse as ONNX is not the same model
        return False


def equivalence(original: Path, rebuilt: Path) -> str | None:
    """For a rebuild that could not be byte-identical (lathe.determinism.machine_can_honour_pins): how
    the two packages agree - self-test logits within the package's atol and the same test metrics at
    the same threshold - or None when they do not."""
    import numpy as np

    try:
        arrays = []
        for pkg in (original, rebuilt):
            with np.load(pkg / SELFTEST_FILE, allow_pickle=False) as z:
                arrays.append((z["images"], z["logits"]))
        atol = float(json.loads((original / PREPROCESSING_FILE).read_text())["selftest"]["atol"])
        ma, mb = (identity_view(json.loads((p / MANIFEST_FILE).read_text())) for p in (original, rebuilt))
    except (OSError, KeyError, ValueError, TypeError):
        return None
    (ia, la), (ib, lb) = arrays
    if ia.shape != ib.shape or not np.array_equal(ia, ib) or la.shape != lb.shape:
        return None
    worst = float(np.abs(la.astype(np.float64) - lb.astype(np.float64)).max()) if la.size else 0.0
    if worst > atol or ma.get("metrics") != mb.get("metrics"):
        return None
    return f"self-test logits within {worst:.2g} <= atol {atol:g}, test metrics and threshold equal"


def _oneline(text: str, limit: int = 1000) -> str:
    return " ".join(line.strip("- ") for line in text.splitlines()[1:] if line.strip())[:limit]


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular member's bytes (extractfile returns None only for non-files, which callers skip)."""
    handle = tar.extractfile(member)
    return handle.read() if handle is not None else b""


def compare_archives(original: Path, rebuilt: Path, follows: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Members (other than */signature and the files in `follows`, already compared as measurements)
    that differ between two archives: names, headers or bytes."""

    def members(path: Path) -> dict[str, tuple]:
        with tarfile.open(path, "r:gz") as tar:
            return {m.name: (m.mode, m.uid, m.gid, m.uname, m.gname, m.mtime, m.type,
                             sha256_bytes(_member_bytes(tar, m)) if m.isreg() else None)
                    for m in tar.getmembers() if m.name.rpartition("/")[2] not in {SIGNATURE_FILE, *follows}}

    a, b = members(original), members(rebuilt)
    return [f"archive member {n}: " + ("only in rebuilt" if n not in a else "missing from rebuilt" if n not in b
                                       else "differs (header or content)")
            for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
