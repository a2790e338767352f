"""`verify_package`: re-hash, stamp, signature, self-test; every tamper detected with a specific message.

Packages are built here by `build_package` (a tiny hand-made ONNX classifier stamped, hashed and
signed with lathe.package's own rules) so these tests need no trained model or DVC run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lathe.audit.verify import json_diff, verify_package
from lathe.io import sha256_bytes, sha256_file, write_json
from lathe.ship.archive import write_archive
from lathe.ship.contract import npz_bytes, package_id_of, stamp_model_bytes, unstamped_model_bytes
from lathe.ship.signing import generate_keys, sign_package

SIZE = 8


def tiny_model(seed: int) -> onnx.ModelProto:
    """(N, 1, S, S) float -> Flatten -> MatMul -> (N, 4) logits."""
    w = np.random.default_rng(seed).normal(size=(SIZE * SIZE, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def build_package(dest: Path, private_key: Path, seed: int = 0, target: str = "edge",
                  raw_md5: str = "a" * 32 + ".dir", commit: str = "0" * 40) -> Path:
    """A valid lathe.package/1 folder: model stamped with the manifest hash, signed."""
    from lathe.evaluate import load_session, predict

    pkg = dest / target
    pkg.mkdir(parents=True)
    model = tiny_model(seed)
    unstamped = model.SerializeToString()
    (pkg / "model.onnx").write_bytes(unstamped)
    images = np.random.default_rng(seed).integers(0, 256, size=(3, SIZE, SIZE), dtype=np.uint8)
    expected = predict(load_session(pkg / "model.onnx", 1), images)
    (pkg / "selftest.npz").write_bytes(npz_bytes({"images": images, "logits": expected}))
    write_json(pkg / "preprocessing.json", {"input": "x", "shape": [1, 1, SIZE, SIZE], "scale": "x/255"})
    (pkg / "model_card.md").write_text(f"# model card {seed}\n")
    manifest = {
        "schema": "lathe.package/1", "target": {"name": target},
        "variant": "quantized/student",
        "files": {"model.onnx": sha256_bytes(unstamped_model_bytes(unstamped)),
                  **{n: sha256_file(pkg / n) for n in ("preprocessing.json", "model_card.md", "selftest.npz")}},
        "source_model_sha256": sha256_bytes(unstamped),
        "git": {"commit": commit, "dirty": False, "dirty_allowed": False},
        "stages": {"ingest": {"cmd": "python -m stages.ingest", "deps": [{"path": "data/raw", "md5": raw_md5}],
                              "outs": [{"path": "data/prepared", "md5": "b" * 32 + ".dir"}]},
                   "quantize@student": {"cmd": "q", "deps": [], "outs": [{"path": "models/quantized/student",
                                                                         "md5": "c" * 32 + ".dir"}]}},
        "chain": ["data/raw", "ingest", "quantize@student", f"package@{target}"],
        "raw_data": {"path": "data/raw", "md5": raw_md5, "files": 49, "samples": 48,
                     "class_counts": {"0": 12, "1": 12, "2": 12, "3": 12}},
        "validation": {"success": True, "sha256": "d" * 64, "summary": "12/12 expectations met"},
        "calibration": None, "params": {"ingest": {"image_size": SIZE}},
        "libraries": {"onnx": onnx.__version__}, "metrics": {"test": {"accuracy": 0.5}},
        "gates": [{"gate": "max_size_bytes", "limit": 500000, "value": 300, "passed": True}],
        "build": {"time": "2024-01-01T00:00:00Z", "flow_run_id": None},
    }
    manifest["package_id"] = package_id_of(manifest)
    write_json(pkg / "manifest.json", manifest)
    (pkg / "model.onnx").write_bytes(stamp_model_bytes(unstamped, manifest["package_id"],
                                                       sha256_file(pkg / "manifest.json")))
    sign_package(pkg, private_key)
    return pkg


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    generate_keys(root / "k.pem", root / "k.pub")
    generate_keys(root / "other.pem", root / "other.pub")
    return {"priv": root / "k.pem", "pub": root / "k.pub", "other_priv": root / "other.pem",
            "other_pub": root / "other.pub"}


@pytest.fixture(scope="module")
def golden(tmp_path_factory, keys) -> Path:
    return build_package(tmp_path_factory.mktemp("golden"), keys["priv"])


@pytest.fixture
def pkg(tmp_path, golden) -> Path:
    dest = tmp_path / "edge"
    shutil.copytree(golden, dest)
    return dest


def failed(report) -> dict[str, str]:
    return {c.name: c.message for c in report.checks if not c.passed}


def test_valid_package_passes_every_check(pkg, keys):
    report = verify_package(pkg, keys["pub"])
    assert report.ok, failed(report)
    names = [c.name for c in report.checks]
    assert {"manifest", "hash model.onnx", "hash selftest.npz", "file set", "model stamp", "signature",
            "self-test"} <= set(names)


def test_archive_verifies_and_sidecar_checked(tmp_path, pkg, keys):
    digest = write_archive(pkg, tmp_path / "edge.tar.gz", mtime=0)
    report = verify_package(tmp_path / "edge.tar.gz", keys["pub"])
    assert report.ok, failed(report)
    (tmp_path / "edge.tar.gz.sha256").write_text("0" * 64 + "  edge.tar.gz\n")
    report = verify_package(tmp_path / "edge.tar.gz", keys["pub"])
    assert "archive sha256" in failed(report) and digest[:16] in failed(report)["archive sha256"]


FILES = ["model.onnx", "preprocessing.json", "manifest.json", "model_card.md", "selftest.npz", "signature"]


@pytest.mark.parametrize("name", FILES)
def test_one_byte_flipped_in_each_file_is_detected(pkg, keys, name):
    path = pkg / name
    data = bytearray(path.read_bytes())
    # the middle byte: inside the weights / payload, not a header that merely breaks parsing
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    bad = failed(verify_package(pkg, keys["pub"]))
    assert "signature" in bad
    if name == "signature":
        assert set(bad) == {"signature"}
    else:
        assert name in bad["signature"]
    if name in ("preprocessing.json", "model_card.md", "selftest.npz", "model.onnx"):
        assert f"hash {name}" in bad and name in bad[f"hash {name}"]
    if name == "manifest.json":
        assert ("model stamp" in bad and "manifest" in bad["model stamp"]) or "manifest" in bad


def test_file_added(pkg, keys):
    (pkg / "extra.bin").write_bytes(b"x")
    bad = failed(verify_package(pkg, keys["pub"]))
    assert "added): extra.bin" in bad["file set"]
    assert "added since signing: extra.bin" in bad["signature"]


def test_file_removed(pkg, keys):
    (pkg / "model_card.md").unlink()
    bad = failed(verify_package(pkg, keys["pub"]))
    assert "removed: model_card.md" in bad["file set"]
    assert "missing" in bad["hash model_card.md"]
    assert "removed since signing: model_card.md" in bad["signature"]


def test_file_renamed(pkg, keys):
    (pkg / "preprocessing.json").rename(pkg / "preprocessing.old.json")
    bad = failed(verify_package(pkg, keys["pub"]))
    assert "renamed: preprocessing.json -> preprocessing.old.json" in bad["file set"]


def test_model_renamed(pkg, keys):
    (pkg / "model.onnx").rename(pkg / "model2.onnx")
    bad = failed(verify_package(pkg, keys["pub"]))
    assert "renamed: model.onnx -> model2.onnx" in bad["file set"]


def test_signature_of_another_package(tmp_path, pkg, keys):
    other = build_package(tmp_path / "other", keys["priv"], seed=1)
    shutil.copy2(other / "signature", pkg / "signature")
    bad = failed(verify_package(pkg, keys["pub"]))
    assert set(bad) == {"signature"}
    assert "hash mismatch" in bad["signature"] and "model.onnx" in bad["signature"]


def test_wrong_public_key(pkg, keys):
    bad = failed(verify_package(pkg, keys["other_pub"]))
    assert set(bad) == {"signature"} and "not made by the key" in bad["signature"]


def test_manifest_edited_to_name_other_data(pkg, keys):
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["raw_data"]["md5"] = "f" * 32 + ".dir"
    write_json(pkg / "manifest.json", manifest)
    bad = failed(verify_package(pkg, keys["pub"]))
    assert "not the one this model was stamped with" in bad["model stamp"]
    assert "manifest.json" in bad["signature"]


def test_manifest_and_model_restamped_still_caught_by_signature(pkg, keys):
    """An attacker who edits the manifest and re-stamps the model still lacks the private key."""
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["raw_data"]["md5"] = "f" * 32 + ".dir"
    write_json(pkg / "manifest.json", manifest)
    proto = onnx.load(str(pkg / "model.onnx"))
    for p in proto.metadata_props:
        if p.key == "lathe.manifest_sha256":
            p.value = sha256_file(pkg / "manifest.json")
    (pkg / "model.onnx").write_bytes(proto.SerializeToString())
    bad = failed(verify_package(pkg, keys["pub"]))
    assert set(bad) == {"model stamp", "signature"}
    assert "the manifest was edited" in bad["model stamp"]  # package_id no longer matches the content
    assert "manifest.json" in bad["signature"] and "model.onnx" in bad["signature"]


def test_selftest_with_pickled_object_refused(pkg, keys):
    np.savez(pkg / "selftest.npz", images=np.array([object()], dtype=object), logits=np.zeros(1))
    bad = failed(verify_package(pkg, keys["pub"]))
    assert "without pickle" in bad["self-test"]


def test_selftest_wrong_expected_outputs(pkg, keys):
    with np.load(pkg / "selftest.npz") as npz:
        images, expected = npz["images"], npz["logits"]
    np.savez(pkg / "selftest.npz", images=images, logits=expected + 0.01)
    bad = failed(verify_package(pkg, keys["pub"]))
    assert "differ from selftest.npz by more than" in bad["self-test"]


def test_missing_package_and_unsafe_archive(tmp_path, keys):
    assert not verify_package(tmp_path / "nope", keys["pub"]).ok
    (tmp_path / "bad.tar.gz").write_bytes(b"junk")
    bad = failed(verify_package(tmp_path / "bad.tar.gz", keys["pub"]))
    assert "not a readable tar" in bad["archive"]


def test_json_diff_key_paths():
    a = {"raw_data": {"md5": "x", "files": 3}, "gates": [{"v": 1}], "k": 1}
    b = {"raw_data": {"md5": "y", "files": 3}, "gates": [{"v": 2}], "n": 2}
    assert json_diff(a, b) == ["gates[0].v", "k (only in original)", "n (only in rebuilt)", "raw_data.md5"]


def test_compare_packages_lists_files_and_manifest_keys(tmp_path, golden, keys):
    from lathe.audit.rebuild import compare_archives, compare_packages

    a, b = tmp_path / "a" / "edge", tmp_path / "b" / "edge"
    shutil.copytree(golden, a)
    shutil.copytree(golden, b)
    sign_package(b, keys["priv"])  # a new (randomised) signature is not a difference
    assert compare_packages(a, b) == []
    write_archive(a, tmp_path / "a.tar.gz", mtime=0)
    write_archive(b, tmp_path / "b.tar.gz", mtime=0)
    assert compare_archives(tmp_path / "a.tar.gz", tmp_path / "b.tar.gz") == []
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["build"]["flow_run_id"] = "run-2"
    write_json(b / "manifest.json", manifest)
    (b / "model_card.md").write_text("other\n")
    diffs = compare_packages(a, b)
    assert diffs[0] == "manifest.json: differs at build.flow_run_id"
    assert diffs[1].startswith("model_card.md: sha256")
    write_archive(b, tmp_path / "b.tar.gz", mtime=0)
    assert compare_archives(tmp_path / "a.tar.gz", tmp_path / "b.tar.gz") == [
        "archive member edge/manifest.json: differs (header or content)",
        "archive member edge/model_card.md: differs (header or content)"]


def test_rebuild_picks_the_dvc_lock_the_manifest_records(tmp_path):
    """The package's commit often predates the dvc.lock it was built with: the rebuild matches the
    manifest's recorded stages against each dvc.lock candidate and names the first stage that differs."""
    from lathe.audit.rebuild import _lock_mismatch, _tracked_outputs
    from lathe.ship.lineage import _lock_entry, stage_chain

    lock = {"schema": "2.0", "stages": {
        "ingest": {"cmd": "python -m stages.ingest data/raw data/prepared",
                   "deps": [{"path": "data/raw", "hash": "md5", "md5": "r" * 32 + ".dir", "nfiles": 3}],
                   "params": {"params.yaml": {"ingest": {"seed": 0}}},
                   "outs": [{"path": "data/prepared", "hash": "md5", "md5": "p" * 32 + ".dir", "size": 9}]},
        "evaluate@x": {"cmd": "python -m stages.evaluate x",
                       "deps": [{"path": "data/prepared", "md5": "p" * 32 + ".dir"}],
                       "outs": [{"path": "reports/x/metrics.json", "md5": "m" * 32}]}}}
    _, entries, _ = stage_chain(lock, ["reports/x/metrics.json"])
    manifest = json.loads(json.dumps({"stages": entries}))  # as read back from manifest.json
    assert _lock_mismatch(lock, manifest) is None
    rerun = json.loads(json.dumps(lock))
    rerun["stages"]["ingest"]["outs"][0]["md5"] = "q" * 32 + ".dir"
    assert _lock_mismatch(rerun, manifest) == "stage ingest differs"
    del rerun["stages"]["evaluate@x"]
    assert _lock_mismatch(rerun, manifest) == "no stage evaluate@x"
    assert _lock_entry(lock["stages"]["ingest"])["outs"] == [{"path": "data/prepared", "md5": "p" * 32 + ".dir"}]

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw.dvc").write_text("outs:\n- md5: " + "r" * 32 + ".dir\n  path: raw\n")
    assert _tracked_outputs(tmp_path, lock) == {"data/raw": "r" * 32 + ".dir", "data/prepared": "p" * 32 + ".dir",
                                                "reports/x/metrics.json": "m" * 32}
