"""`lathe verify`: is this package (folder or shipped .tar.gz) the one that was built and signed, does
it still work, and does it rebuild identically?

Each check is a named line, PASS or FAIL with a specific message; the package passes only when
every line passes. Nothing is unpickled (selftest.npz is loaded with allow_pickle=False) and a
model with external-data references is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lathe.errors import LatheError
from lathe.io import sha256_bytes, sha256_file

SCHEMA = "lathe.package/1"
MANIFEST = "manifest.json"
SIGNATURE = "signature"
MODEL = "model.onnx"
SELFTEST = "selftest.npz"
META_PACKAGE_ID = "lathe.package_id"
META_MANIFEST_SHA = "lathe.manifest_sha256"
SELFTEST_ATOL = 1e-3  # same machine gives equality; this allows float summation-order noise on others
# names the self-test arrays may carry (inputs: uint8 images (N, S, S); outputs: float32 logits (N, K))
SELFTEST_INPUT_KEYS = ("inputs", "images", "input", "x")
SELFTEST_OUTPUT_KEYS = ("expected", "outputs", "logits", "expected_outputs", "output", "y")


@dataclass(frozen=True)
class Check:
    """One named verification line."""

    name: str
    passed: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "message": self.message}


@dataclass
class VerifyReport:
    """Every check run against one package, in order."""

    package: str
    checks: list[Check] = field(default_factory=list)
    manifest: dict | None = None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def add(self, name: str, passed: bool, message: str) -> None:
        self.checks.append(Check(name, passed, message))

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        return {"package": self.package, "ok": self.ok, "checks": [c.as_dict() for c in self.checks]}


# ---------------------------------------------------------------------------------------------
# helpers


def unstamped_model_bytes(data: bytes) -> bytes:
    """The model file without the two lathe.* metadata entries (lathe.package owns the rule)."""
    from lathe.ship.contract import unstamped_model_bytes as unstamp  # lazy: package imports heavy deps

    return unstamp(data)


def model_metadata(data: bytes) -> dict[str, str]:
    """metadata_props of a serialized ONNX model (raises LatheError when it does not parse)."""
    import onnx

    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:
        raise LatheError(f"not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    return {p.key: p.value for p in proto.metadata_props}


def external_data_refs(data: bytes) -> list[str]:
    """Names of tensors that keep their data outside the model file (a package must have none)."""
    import onnx

    from lathe.evaluate import _tensors

    proto = onnx.load_from_string(data)
    return [t.name for t in _tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL]


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


def _short(h: str | None) -> str:
    return (h or "none")[:16]


def _package_dir_in(extracted: Path) -> Path:
    """The single top-level folder of an extracted archive."""
    tops = [p for p in extracted.iterdir()]
    if len(tops) != 1 or not tops[0].is_dir():
        raise LatheError(f"archive must hold exactly one top-level folder (<target>/), found "
                         f"{sorted(p.name for p in tops)}")
    return tops[0]


# ---------------------------------------------------------------------------------------------
# checks on a package folder


def _check_manifest(pkg: Path, report: VerifyReport) -> dict | None:
    path = pkg / MANIFEST
    if not path.is_file():
        report.add("manifest", False, f"{MANIFEST} is missing")
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        report.add("manifest", False, f"{MANIFEST} is not valid JSON ({exc})")
        return None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        got = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        report.add("manifest", False, f"{MANIFEST}: schema is {got!r}, expected {SCHEMA!r}")
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        report.add("manifest", False, f"{MANIFEST}: 'files' must map file names to sha256 hex")
        return None
    bad = [n for n in files if "/" in n or "\\" in n or n in ("", ".", "..", MANIFEST, SIGNATURE)]
    if bad:
        report.add("manifest", False, f"{MANIFEST}: 'files' lists names that cannot be package files: {bad}")
        return None
    report.add("manifest", True, f"{SCHEMA}, package {manifest.get('package_id')}, {len(files)} files listed")
    return manifest


def _file_hash(pkg: Path, name: str) -> str:
    """The hash the manifest records for `name`: unstamped for the model, plain sha256 otherwise."""
    data = (pkg / name).read_bytes()
    if name == MODEL:
        return sha256_bytes(unstamped_model_bytes(data))
    return sha256_bytes(data)


def _check_files(pkg: Path, manifest: dict, report: VerifyReport) -> None:
    listed: dict[str, str] = manifest["files"]
    present = {p.name for p in pkg.iterdir()}
    for name in sorted(listed):
        if name not in present:
            report.add(f"hash {name}", False, f"{name} is listed in {MANIFEST} but missing from the package")
            continue
        if not (pkg / name).is_file() or (pkg / name).is_symlink():
            report.add(f"hash {name}", False, f"{name} is not a regular file")
            continue
        try:
            actual = _file_hash(pkg, name)
        except LatheError as exc:
            report.add(f"hash {name}", False, f"{name}: {exc}")
            continue
        except Exception as exc:  # unstamping a corrupt model
            report.add(f"hash {name}", False, f"{name}: cannot be read as ONNX to unstamp ({type(exc).__name__}: {exc})")
            continue
        if actual == listed[name]:
            what = "unstamped sha256" if name == MODEL else "sha256"
            report.add(f"hash {name}", True, f"{what} {_short(actual)}… matches {MANIFEST}")
        else:
            report.add(f"hash {name}", False, f"{name}: sha256 {_short(actual)}… but {MANIFEST} records "
                                              f"{_short(listed[name])}…: the file was changed")

    allowed = set(listed) | {MANIFEST, SIGNATURE}
    extra = sorted(present - allowed)
    missing = sorted(n for n in listed if n not in present)
    # a rename shows up as one missing and one extra file with the same content
    renamed = []
    for m in list(missing):
        for e in list(extra):
            path = pkg / e
            if not path.is_file():
                continue
            data = path.read_bytes()
            hashes = {sha256_bytes(data)}
            if m == MODEL:
                try:
                    hashes.add(sha256_bytes(unstamped_model_bytes(data)))
                except Exception:
                    pass
            if listed[m] in hashes:
                renamed.append(f"{m} -> {e}")
                missing.remove(m)
                extra.remove(e)
                break
    problems = []
    if renamed:
        problems.append(f"renamed: {', '.join(renamed)}")
    if extra:
        problems.append(f"not in {MANIFEST} (added): {', '.join(extra)}")
    if missing:
        problems.append(f"removed: {', '.join(missing)}")
    if SIGNATURE not in present:
        problems.append(f"removed: {SIGNATURE}")
    if problems:
        report.add("file set", False, "; ".join(problems))
    else:
        report.add("file set", True, f"exactly the {len(listed)} listed files plus {MANIFEST} and {SIGNATURE}")


def _check_model_stamp(pkg: Path, manifest: dict, report: VerifyReport) -> None:
    model, man = pkg / MODEL, pkg / MANIFEST
    if not model.is_file():
        report.add("model stamp", False, f"{MODEL} is missing")
        return
    data = model.read_bytes()
    try:
        meta = model_metadata(data)
        ext = external_data_refs(data)
    except LatheError as exc:
        report.add("model stamp", False, f"{MODEL}: {exc}")
        return
    problems = []
    if ext:
        problems.append(f"{MODEL} references external data for {ext[:5]}; packages must be self-contained")
    man_sha = sha256_file(man)
    if meta.get(META_MANIFEST_SHA) != man_sha:
        problems.append(f"{MANIFEST} sha256 is {_short(man_sha)}… but {MODEL} metadata {META_MANIFEST_SHA} is "
                        f"{_short(meta.get(META_MANIFEST_SHA))}…: the manifest is not the one this model was stamped with")
    if meta.get(META_PACKAGE_ID) != manifest.get("package_id"):
        problems.append(f"{MODEL} metadata {META_PACKAGE_ID} is {meta.get(META_PACKAGE_ID)!r} but {MANIFEST} "
                        f"package_id is {manifest.get('package_id')!r}")
    from lathe.ship.contract import package_id_of  # lazy, as unstamped_model_bytes

    recomputed = package_id_of(manifest)
    if recomputed != manifest.get("package_id"):
        problems.append(f"{MANIFEST} package_id is {manifest.get('package_id')!r} but its content hashes to "
                        f"{recomputed!r}: the manifest was edited")
    if problems:
        report.add("model stamp", False, "; ".join(problems))
    else:
        report.add("model stamp", True, f"{META_PACKAGE_ID} and {META_MANIFEST_SHA} match {MANIFEST}")


def _check_signature(pkg: Path, public_key: Path | None, report: VerifyReport, name: str = "signature") -> None:
    from lathe.ship.signing import verify_signature

    if public_key is None:
        report.add(name, False, "no public key given (--public-key) and none at the default path")
        return
    try:
        verify_signature(pkg, public_key)
    except LatheError as exc:
        report.add(name, False, str(exc))
        return
    report.add(name, True, f"valid, made by the key {public_key}; covers every file")


def _pick(arrays: dict[str, np.ndarray], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in arrays), None)


def _check_selftest(pkg: Path, report: VerifyReport) -> None:
    from lathe.evaluate import load_session, predict

    st, model = pkg / SELFTEST, pkg / MODEL
    if not st.is_file() or not model.is_file():
        report.add("self-test", False, f"{SELFTEST if not st.is_file() else MODEL} is missing")
        return
    try:
        with np.load(st, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # ValueError on object arrays (pickle refused), BadZipFile, ...
        report.add("self-test", False, f"{SELFTEST} cannot be loaded without pickle ({type(exc).__name__}: {exc})")
        return
    xk, yk = _pick(arrays, SELFTEST_INPUT_KEYS), _pick(arrays, SELFTEST_OUTPUT_KEYS)
    if xk is None or yk is None:
        report.add("self-test", False, f"{SELFTEST} holds {sorted(arrays)}; expected inputs and expected outputs")
        return
    images, expected = arrays[xk], arrays[yk]
    if images.dtype != np.uint8 or images.ndim != 3:
        report.add("self-test", False, f"{SELFTEST}[{xk}] is {images.dtype} {images.shape}; expected (N, S, S) uint8")
        return
    try:
        if external_data_refs(model.read_bytes()):
            raise LatheError("model references external data; refused")
        session = load_session(model, threads=1)
        got = predict(session, images)
    except Exception as exc:
        report.add("self-test", False, f"{MODEL} does not run: {exc}")
        return
    if got.shape != expected.shape:
        report.add("self-test", False, f"outputs have shape {got.shape}, expected {expected.shape}")
        return
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    worst = float(diff.max()) if diff.size else 0.0
    if not np.all(np.isfinite(got)) or worst > SELFTEST_ATOL:
        bad = int((diff > SELFTEST_ATOL).sum())
        report.add("self-test", False, f"{bad} of {diff.size} outputs differ from {SELFTEST} by more than "
                                       f"{SELFTEST_ATOL} (max {worst:.3g}) on {len(images)} golden inputs")
        return
    agree = int((got.argmax(1) == expected.argmax(1)).sum())
    report.add("self-test", True, f"{len(images)} golden inputs, max |diff| {worst:.3g} <= {SELFTEST_ATOL}, "
                                  f"{agree}/{len(images)} classes agree")


def verify_folder(pkg: Path, public_key: Path | None, report: VerifyReport) -> dict | None:
    """Run every offline check on a package folder; return the manifest (None if unreadable)."""
    manifest = _check_manifest(pkg, report)
    if manifest is not None:
        _check_files(pkg, manifest, report)
        _check_model_stamp(pkg, manifest, report)
    _check_signature(pkg, public_key, report)
    _check_selftest(pkg, report)
    report.manifest = manifest
    return manifest


def _check_archive_sidecar(archive: Path, report: VerifyReport) -> None:
    side = archive.with_name(archive.name + ".sha256")
    if not side.is_file():
        return  # the sidecar ships beside the archive but is optional evidence here
    actual = sha256_file(archive)
    recorded = side.read_text().split()[0] if side.read_text().split() else ""
    if actual == recorded:
        report.add("archive sha256", True, f"{archive.name} matches {side.name}")
    else:
        report.add("archive sha256", False, f"{archive.name} sha256 {_short(actual)}… but {side.name} says "
                                            f"{_short(recorded)}…")



# ---------------------------------------------------------------------------------------------
# entry point


def default_public_key(repo: Path | None = None) -> Path | None:
    """LATHE_PUBLIC_KEY, else <repo or cwd>/.lathe/keys/signing-key.pub when it exists."""
    env = os.environ.get("LATHE_PUBLIC_KEY")
    if env:
        return Path(env)
    cand = Path(repo or Path.cwd()) / ".lathe" / "keys" / "signing-key.pub"
    return cand if cand.is_file() else None


def verify_package(pkg_or_archive: Path, public_key: Path | None, rebuild: bool = False, repo: Path | None = None,
                   signing_key: Path | None = None, full: bool = False) -> VerifyReport:
    """Verify a package folder or a shipped `<target>.tar.gz` (unpacked safely to a temp folder first)."""
    from lathe.audit.rebuild import rebuild_and_compare
    from lathe.ship.archive import safe_extract

    src = Path(pkg_or_archive)
    report = VerifyReport(package=str(src))
    if not src.exists():
        report.add("package", False, f"{src} does not exist")
        return report
    with tempfile.TemporaryDirectory(prefix="lathe-verify-") as tmp:
        if src.is_dir():
            pkg = src
        else:
            _check_archive_sidecar(src, report)
            try:
                safe_extract(src, Path(tmp) / "x")
                pkg = _package_dir_in(Path(tmp) / "x")
            except LatheError as exc:
                report.add("archive", False, str(exc))
                return report
            report.add("archive", True, f"unpacked safely ({pkg.name}/)")
        manifest = verify_folder(pkg, public_key, report)
        if rebuild:
            if manifest is None:
                report.add("rebuild", False, f"no readable {MANIFEST}; cannot rebuild")
            else:
                rebuild_and_compare(pkg, manifest, Path(repo or Path.cwd()), public_key, report,
                                    signing_key=signing_key, full=full, archive=None if src.is_dir() else src)
    return report
