"""`lathe.trace`: lineage from the package alone, and the cross-check against a git repo's history."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lathe.errors import LatheError
from lathe.io import sha256_file
from lathe.audit.trace import trace
from lathe.ship.signing import generate_keys
from tests.lathe.test_verify import build_package

RAW_MD5 = "1234567890abcdef1234567890abcdef.dir"
SRC_MD5 = "c" * 32 + ".dir"  # the quantize@student out md5 build_package records


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def make_repo(root: Path, raw_md5: str = RAW_MD5) -> Path:
    """A git repo with data/raw.dvc and a dvc.lock listing the model's source hash, committed."""
    repo = root / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "raw.dvc").write_text(yaml.safe_dump({"outs": [{"md5": raw_md5, "path": "raw", "nfiles": 49}]}))
    (repo / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "quantize@student": {"cmd": "q", "outs": [{"path": "models/quantized/student", "md5": SRC_MD5}]}}}))
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@lathe.invalid")
    git(repo, "config", "user.name", "t")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "data and lock")
    return repo


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    generate_keys(root / "k.pem", root / "k.pub")
    return root / "k.pem"


@pytest.fixture
def repo_pkg(tmp_path, key) -> tuple[Path, Path]:
    repo = make_repo(tmp_path)
    pkg = build_package(repo / "models" / "packages", key, commit=git(repo, "rev-parse", "HEAD"), raw_md5=RAW_MD5)
    return repo, pkg


def test_trace_package_alone_outside_repo(tmp_path, key, monkeypatch):
    pkg = build_package(tmp_path / "plant", key, raw_md5=RAW_MD5)
    monkeypatch.chdir(tmp_path)
    result = trace(str(pkg))
    assert result["raw_data"]["md5"] == RAW_MD5
    assert result["raw_data"]["class_counts"] == {"0": 12, "1": 12, "2": 12, "3": 12}
    assert result["validation"]["success"] is True
    assert [r["step"] for r in result["chain"]] == ["data/raw", "ingest", "quantize@student", "package@edge"]
    assert result["chain"][0]["outs"][0]["md5"] == RAW_MD5
    assert result["chain"][-1]["outs"][1]["sha256"] == sha256_file(pkg / "model.onnx")
    assert result["model_matches_manifest"] is True
    assert "cross_check" not in result


def test_trace_in_repo_cross_check_ok(repo_pkg):
    repo, pkg = repo_pkg
    result = trace(str(pkg), repo=repo)
    cc = result["cross_check"]
    assert cc["status"] == "OK", cc
    assert cc["raw_dvc_md5_at_commit"] == RAW_MD5
    assert cc["lock_commits"] == [git(repo, "rev-parse", "HEAD")]


def test_trace_bare_model_file_through_metadata(repo_pkg, tmp_path):
    repo, pkg = repo_pkg
    loose = tmp_path / "from-device" / "model.onnx"
    loose.parent.mkdir()
    shutil.copy2(pkg / "model.onnx", loose)
    result = trace(str(loose), repo=repo)
    assert result["found_by"] == "model metadata"
    assert result["manifest_path"] == str(pkg / "manifest.json")
    assert result["raw_data"]["md5"] == RAW_MD5 and result["cross_check"]["status"] == "OK"


def test_trace_by_sha256(repo_pkg):
    repo, pkg = repo_pkg
    result = trace(sha256_file(pkg / "model.onnx"), repo=repo)
    assert result["package_id"] and result["found_by"] == "sha256 of model.onnx"
    with pytest.raises(LatheError, match="no package"):
        trace("0" * 64, repo=repo)


def test_trace_raw_md5_mismatch_is_loud(tmp_path, key):
    repo = make_repo(tmp_path, raw_md5="ffffffffffffffffffffffffffffffff.dir")
    pkg = build_package(repo / "models" / "packages", key, commit=git(repo, "rev-parse", "HEAD"), raw_md5=RAW_MD5)
    cc = trace(str(pkg), repo=repo)["cross_check"]
    assert cc["status"] == "MISMATCH"
    assert any(f.startswith("MISMATCH raw data") and RAW_MD5 in f for f in cc["findings"])


def test_trace_unknown_commit_and_unstamped_model(tmp_path, key):
    repo = make_repo(tmp_path)
    pkg = build_package(repo / "models" / "packages", key, commit="f" * 40)
    cc = trace(str(pkg), repo=repo)["cross_check"]
    assert cc["status"] == "UNKNOWN" and "not in this repository" in cc["findings"][0]
    from tests.lathe.test_verify import tiny_model

    bare = tmp_path / "bare.onnx"
    bare.write_bytes(tiny_model(0).SerializeToString())
    with pytest.raises(LatheError, match="no lathe.package_id"):
        trace(str(bare), repo=repo)
