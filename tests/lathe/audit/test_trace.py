"""`lathe trace`: finds the package (folder, archive, bare model, sha256 now or from an earlier commit), verifies
it before vouching for it (VERIFIED / UNVERIFIED / MISMATCH, with exit statuses), and cross-checks the whole
chain of stage hashes against the repository's history (OK / MISMATCH / UNKNOWN)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
import yaml
from typer.testing import CliRunner

from lathe.audit.trace import exit_status, trace
from lathe.audit.trust import resolve_trust
from lathe.cli import app
from lathe.errors import LatheError
from lathe.io import sha256_file, write_json
from tests.packages import build_package, make_keys, reseal, tiny_model
from tests.tiny import offline_env

RAW_MD5 = "1234567890abcdef1234567890abcdef.dir"
runner = CliRunner()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def make_repo(root: Path, raw_md5: str = RAW_MD5) -> Path:
    repo = root / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "raw.dvc").write_text(yaml.safe_dump({"outs": [{"md5": raw_md5, "path": "raw", "nfiles": 49}]}))
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@lathe.invalid")
    git(repo, "config", "user.name", "t")
    commit_all(repo, "data")
    return repo


def lock_of(pkg: Path, **override_outs: str) -> dict:
    """The dvc.lock a run that built `pkg` would leave (its manifest's stage entries), outs overridable."""
    stages = json.loads((pkg / "manifest.json").read_text())["stages"]
    for name, md5 in override_outs.items():
        stages[name.replace("_at_", "@")]["outs"][0]["md5"] = md5
    return {"schema": "2.0", "stages": stages}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def repo_pkg(tmp_path, keys) -> tuple[Path, Path]:
    """A repository whose HEAD holds the dvc.lock the package was built with, and the package."""
    repo = make_repo(tmp_path)
    pkg = build_package(repo / "models" / "packages", keys["priv"], commit=git(repo, "rev-parse", "HEAD"),
                        raw_md5=RAW_MD5)
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock_of(pkg)))
    (repo / ".gitignore").write_text("/models/packages\n")
    commit_all(repo, "lock after the run")
    return repo, pkg


def run(subject: str, keys: dict | None, repo: Path | None = None) -> dict:
    return trace(subject, resolve_trust(Path(subject) if Path(subject).exists() else None,
                                        keys["pub"] if keys else None), repo=repo)


def test_package_alone_outside_a_repo_is_verified(tmp_path, keys, monkeypatch):
    pkg = build_package(tmp_path / "plant", keys["priv"], raw_md5=RAW_MD5)
    monkeypatch.chdir(tmp_path)
    result = run(str(pkg), keys)
    assert result["verdict"] == "VERIFIED" and exit_status(result) == 0
    assert result["raw_data"]["md5"] == RAW_MD5 and result["validation"]["success"] is True
    assert [r["step"] for r in result["chain"]] == ["data/raw", "ingest", "quantize@student", "package@edge"]
    assert "cross_check" not in result
    res = runner.invoke(app, ["trace", str(pkg), "--public-key", str(keys["pub"])])
    first = res.output.splitlines()[0]
    assert res.exit_code == 0 and first.startswith("VERIFIED — package") and "signed by sha256:" in first


def test_without_a_trusted_key_the_verdict_is_unverified(tmp_path, keys, monkeypatch):
    pkg = build_package(tmp_path / "plant", keys["priv"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    res = runner.invoke(app, ["trace", str(pkg)])
    assert res.exit_code == 3 and res.output.startswith("UNVERIFIED")


@pytest.mark.parametrize("edit", [
    lambda m: m["validation"].update(success=True, summary="27/27 expectations passed"),
    lambda m: m["raw_data"].update(samples=99999),
    lambda m: m["gates"][0].update(passed=True, value=1),
    lambda m: m["params"]["ingest"].update(image_size=999),
])
def test_a_hand_edited_manifest_is_a_mismatch_never_vouched_for(repo_pkg, keys, edit):
    repo, pkg = repo_pkg
    manifest = json.loads((pkg / "manifest.json").read_text())
    edit(manifest)
    write_json(pkg / "manifest.json", manifest)
    result = run(str(pkg), keys, repo)
    assert result["verdict"] == "MISMATCH" and exit_status(result) == 2
    failed = {c["name"] for c in result["checks"] if c["status"] == "FAIL"}
    assert {"model stamp", "signature"} <= failed
    res = runner.invoke(app, ["trace", str(pkg), "--public-key", str(keys["pub"]), "--repo", str(repo)])
    assert res.exit_code == 2 and res.output.startswith("MISMATCH")


def test_an_edited_manifest_restamped_with_another_key_is_a_mismatch(repo_pkg, keys, tmp_path):
    repo, pkg = repo_pkg
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["validation"]["summary"] = "all fine"
    write_json(pkg / "manifest.json", manifest)
    reseal(pkg, make_keys(tmp_path / "attacker")["priv"])  # consistent hashes, id and stamp; wrong signer
    result = run(str(pkg), keys, repo)
    assert result["verdict"] == "MISMATCH"
    assert [c["name"] for c in result["checks"] if c["status"] == "FAIL"] == ["signature"]


def test_repository_cross_check_ok_when_a_committed_lock_holds_the_whole_chain(repo_pkg, keys):
    repo, pkg = repo_pkg
    result = run(str(pkg), keys, repo)
    cc = result["cross_check"]
    assert result["verdict"] == "VERIFIED" and cc["status"] == "OK" and exit_status(result) == 0, cc
    assert cc["lock_commits"] == [git(repo, "rev-parse", "HEAD")]
    assert any("whole chain (2 stages)" in f for f in cc["findings"])


def test_a_lock_listing_the_model_with_another_upstream_chain_is_a_mismatch(tmp_path, keys):
    repo = make_repo(tmp_path)
    pkg = build_package(repo / "models" / "packages", keys["priv"], commit=git(repo, "rev-parse", "HEAD"),
                        raw_md5=RAW_MD5)
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock_of(pkg, ingest="e" * 32 + ".dir")))
    commit_all(repo, "a lock with the model but another prepared data")
    result = run(str(pkg), keys, repo)
    cc = result["cross_check"]
    assert cc["status"] == "MISMATCH" and exit_status(result) == 2
    assert any(f.startswith("MISMATCH chain") and "its stage ingest differs" in f for f in cc["findings"])


def test_unknown_when_no_committed_lock_holds_it_and_the_exit_status_says_so(tmp_path, keys):
    repo = make_repo(tmp_path)
    pkg = build_package(repo / "models" / "packages", keys["priv"], commit=git(repo, "rev-parse", "HEAD"),
                        raw_md5=RAW_MD5)
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock_of(pkg)))  # working copy only
    result = run(str(pkg), keys, repo)
    assert result["verdict"] == "VERIFIED" and result["cross_check"]["status"] == "UNKNOWN"
    assert exit_status(result) == 4
    assert any("the working dvc.lock does: commit it" in f for f in result["cross_check"]["findings"])
    res = runner.invoke(app, ["trace", str(pkg), "--public-key", str(keys["pub"]), "--repo", str(repo)])
    assert res.exit_code == 4 and "repository cross-check: UNKNOWN" in res.output


def test_raw_data_md5_mismatch_at_the_recorded_commit_is_loud(tmp_path, keys):
    repo = make_repo(tmp_path, raw_md5="ffffffffffffffffffffffffffffffff.dir")
    pkg = build_package(repo / "models" / "packages", keys["priv"], commit=git(repo, "rev-parse", "HEAD"),
                        raw_md5=RAW_MD5)
    cc = run(str(pkg), keys, repo)["cross_check"]
    assert cc["status"] == "MISMATCH"
    assert any(f.startswith("MISMATCH raw data") and RAW_MD5 in f for f in cc["findings"])


def test_bare_model_file_through_its_stamp_and_a_swapped_model(repo_pkg, keys, tmp_path):
    repo, pkg = repo_pkg
    loose = tmp_path / "from-device" / "model.onnx"
    loose.parent.mkdir()
    shutil.copy2(pkg / "model.onnx", loose)
    result = run(str(loose), keys, repo)
    assert result["found_by"].startswith("model stamp") and result["verdict"] == "VERIFIED"
    other = tiny_model(5)
    other.metadata_props.extend(onnx.load(str(loose)).metadata_props)
    loose.write_bytes(other.SerializeToString())  # the stamp of the package, the weights of another model
    result = run(str(loose), keys, repo)
    assert result["verdict"] == "MISMATCH"
    assert any(c["name"] == "model file" and c["status"] == "FAIL" for c in result["checks"])


def test_sha256_search_skips_and_lists_unreadable_packages(repo_pkg, keys):
    repo, pkg = repo_pkg
    broken = pkg.parent / "aaa-broken"
    broken.mkdir()
    (broken / "manifest.json").write_bytes(b"\xff not json")
    result = run(sha256_file(pkg / "model.onnx"), keys, repo)
    assert result["verdict"] == "VERIFIED" and result["found_by"] == "sha256 of model.onnx"
    assert any("aaa-broken" in s for s in result["skipped"])
    with pytest.raises(LatheError, match="no package in .* has a model, manifest or archive with sha256"):
        run("0" * 64, keys, repo)


def dvc_commit(repo: Path, env: dict) -> None:
    res = subprocess.run(["dvc", "commit", "-f", "package"], cwd=repo, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_package_of_an_earlier_commit_is_found_in_the_dvc_cache(tmp_path, keys):
    """The package shipped months ago: its folder was rebuilt since, but dvc.lock's history and DVC's cache keep it."""
    repo = make_repo(tmp_path)
    env = offline_env()
    subprocess.run(["dvc", "init", "-q"], cwd=repo, env=env, check=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"package": {
        "foreach": ["edge"], "do": {"cmd": "true", "outs": ["models/packages/${item}"]}}}}))
    old = build_package(repo / "models" / "packages", keys["priv"], seed=1, commit=git(repo, "rev-parse", "HEAD"))
    dvc_commit(repo, env)
    commit_all(repo, "first package")
    old_sha = sha256_file(old / "model.onnx")
    shutil.rmtree(old)
    build_package(repo / "models" / "packages", keys["priv"], seed=2, commit=git(repo, "rev-parse", "HEAD"))
    dvc_commit(repo, env)
    commit_all(repo, "second package")
    result = run(old_sha, keys, repo)
    assert result["verdict"] == "VERIFIED", result["checks"]
    assert "restored from the DVC cache" in result["found_by"] and "package edge" in result["found_by"]


def test_a_missing_path_says_so_and_suggests_the_near_name(tmp_path, keys, monkeypatch):
    build_package(tmp_path / "models" / "packages", keys["priv"], target="line-pc")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["trace", "models/packages/line_pc"])
    assert res.exit_code == 1 and "did you mean models/packages/line-pc?" in res.output
    assert "Traceback" not in res.output
