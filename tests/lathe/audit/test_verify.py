"""`lathe verify` against a hostile package: every tamper detected, trust anchors explicit, binding to target and
id, nothing run before the signature holds, one-line verdicts. Each class of issue 11 has its tests here
(the trace class is in test_trace.py, the confinement of the self-test in test_selftest.py, the
archive's limits in tests/lathe/ship/test_archive.py, the mutation sweep in test_mutations.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lathe.audit.trust import resolve_trust
from lathe.audit.verify import verify_package
from lathe.cli import app
from lathe.io import sha256_file, write_json
from lathe.ship.archive import write_archive
from lathe.ship.contract import npz_bytes
from lathe.ship.signing import key_fingerprint
from tests.packages import build_package, make_keys, reseal

runner = CliRunner()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    return {**make_keys(root, "k"), **{f"other_{k}": v for k, v in make_keys(root, "other").items()}}


@pytest.fixture(scope="module")
def golden(tmp_path_factory, keys) -> Path:
    return build_package(tmp_path_factory.mktemp("golden"), keys["priv"])


@pytest.fixture
def pkg(tmp_path, golden) -> Path:
    dest = tmp_path / "pkgs" / "edge"
    shutil.copytree(golden, dest)
    return dest


def verify(pkg: Path, pub: Path | None, **kw):
    return verify_package(pkg, resolve_trust(pkg, pub), **kw)


def failed(report) -> dict[str, str]:
    return {c.name: c.message for c in report.checks if c.status == "FAIL"}


def cli(*args: str):
    res = runner.invoke(app, list(args))
    assert "Traceback" not in res.output, res.output
    return res


def test_valid_package_passes_every_check_in_order(pkg, keys):
    report = verify(pkg, keys["pub"])
    assert report.ok, failed(report)
    names = [c.name for c in report.checks]
    assert names == ["file set", "manifest", "binding", "hash model.onnx", "hash model_card.md",
                     "hash preprocessing.json", "hash selftest.npz", "model stamp", "selection", "preprocessing",
                     "model graph",
                     "signature", "self-test"]
    assert report.facts["package id"] == json.loads((pkg / "manifest.json").read_text())["package_id"]
    assert report.facts["target"] == "edge" and report.facts["variant"] == "quantized/student"


def test_archive_verifies_and_a_missing_sidecar_is_a_skip_line(tmp_path, pkg, keys):
    digest = write_archive(pkg, tmp_path / "edge.tar.gz", mtime=0)
    report = verify(tmp_path / "edge.tar.gz", keys["pub"])
    assert report.ok, failed(report)
    assert report.checks[0].name == "archive sha256" and report.checks[0].status == "PASS"
    (tmp_path / "edge.tar.gz.sha256").unlink()
    report = verify(tmp_path / "edge.tar.gz", keys["pub"])
    assert report.ok and report.checks[0].status == "SKIP" and "not checked" in report.checks[0].message
    (tmp_path / "edge.tar.gz.sha256").write_text("0" * 64 + "  edge.tar.gz\n")
    assert digest[:16] in failed(verify(tmp_path / "edge.tar.gz", keys["pub"]))["archive sha256"]


FILES = ["model.onnx", "preprocessing.json", "manifest.json", "model_card.md", "selftest.npz", "signature"]


@pytest.mark.parametrize("name", FILES)
def test_one_byte_flipped_in_each_file_is_detected_and_nothing_runs(pkg, keys, name):
    path = pkg / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the payload, not a header that merely breaks parsing
    path.write_bytes(bytes(data))
    report = verify(pkg, keys["pub"])
    bad = failed(report)
    assert "signature" in bad and not report.ok
    assert report.status_of("self-test") == "SKIP"
    if name in ("preprocessing.json", "model_card.md", "selftest.npz", "model.onnx"):
        assert f"hash {name}" in bad and name in bad["signature"]


def test_file_added_removed_renamed(pkg, keys):
    (pkg / "extra.bin").write_bytes(b"x")
    bad = failed(verify(pkg, keys["pub"]))
    assert "added): extra.bin" in bad["file set"] and "added since signing: extra.bin" in bad["signature"]
    (pkg / "extra.bin").unlink()
    (pkg / "model_card.md").rename(pkg / "model_card.old.md")
    bad = failed(verify(pkg, keys["pub"]))
    assert "missing: model_card.md" in bad["file set"] and "model_card.old.md" in bad["file set"]


def test_a_link_or_fifo_in_the_folder_is_never_read(pkg, keys):
    import os

    os.mkfifo(pkg / "pipe")  # reading it would block for ever
    (pkg / "link").symlink_to("/dev/zero")
    report = verify(pkg, keys["pub"])
    bad = failed(report)
    assert "pipe (not a regular file)" in bad["file set"] and "link (a link)" in bad["file set"]
    assert bad["signature"].startswith("not checked: the folder holds files that are not read")


def test_manifest_edited_and_restamped_without_the_key(pkg, keys):
    import onnx

    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["raw_data"]["md5"] = "f" * 32 + ".dir"
    write_json(pkg / "manifest.json", manifest)
    proto = onnx.load(str(pkg / "model.onnx"))
    for p in proto.metadata_props:
        if p.key == "lathe.manifest_sha256":
            p.value = sha256_file(pkg / "manifest.json")
    (pkg / "model.onnx").write_bytes(proto.SerializeToString())
    bad = failed(verify(pkg, keys["pub"]))
    assert set(bad) == {"model stamp", "signature"}
    assert "the manifest was edited" in bad["model stamp"]
    assert "manifest.json" in bad["signature"] and "model.onnx" in bad["signature"]


# --- class 1: the trust anchor is explicit, and never the package's own


def test_a_key_shipped_beside_an_unpacked_archive_is_not_trusted(tmp_path, golden, keys):
    """tar xzf of an archive that carries its own key pair, then `lathe verify <folder>` in that folder."""
    evil = make_keys(tmp_path / "attacker")
    drop = tmp_path / "download"
    pkg = build_package(drop, evil["priv"], seed=1)
    ring = drop / ".lathe" / "trusted-keys"
    ring.mkdir(parents=True)
    shutil.copy2(evil["pub"], ring / "evil.pub")
    (drop / ".lathe" / "keys").mkdir()
    shutil.copy2(evil["pub"], drop / ".lathe" / "keys" / "signing-key.pub")  # where verify used to look
    subprocess.run(["git", "init", "-q", str(drop)], check=True)  # even inside a git work tree
    import os

    cwd = os.getcwd()
    os.chdir(drop)
    try:
        res = cli("verify", "edge")
        assert res.exit_code == 1 and "ALL CHECKS PASSED" not in res.output
        assert "NOT VERIFIED (signature not checked)" in res.output
        assert "refused keyring" in res.output and "beside the package" in res.output
        report = json.loads(cli("verify", "edge", "--json").output)
        assert {c["name"]: c["status"] for c in report["checks"]}["signature"] == "SKIP"
        assert {c["name"]: c["status"] for c in report["checks"]}["self-test"] == "SKIP"
        res = cli("verify", "edge", "--public-key", ".lathe/keys/signing-key.pub")
        assert res.exit_code == 1 and "refused key" in res.output
        res = cli("verify", "edge", "--public-key", "edge/manifest.json")
        assert res.exit_code == 1 and "inside" in res.output
    finally:
        os.chdir(cwd)
    assert pkg.is_dir()


def test_the_verdict_names_the_key_by_fingerprint_and_source(tmp_path, pkg, keys):
    ring = tmp_path / "ring"
    assert cli("keys", "add", str(keys["pub"]), "--keyring", str(ring)).exit_code == 0
    assert cli("keys", "add", str(keys["other_pub"]), "--keyring", str(ring)).exit_code == 0
    res = cli("verify", str(pkg), "--keyring", str(ring))
    fp = key_fingerprint(keys["pub"])
    assert res.exit_code == 0, res.output
    assert f"made by key sha256:{fp[:16]} from keyring {ring}" in res.output
    assert "ALL CHECKS PASSED" in res.output
    # revoked: the same package no longer verifies
    assert cli("keys", "remove", fp[:12], "--keyring", str(ring)).exit_code == 0
    res = cli("verify", str(pkg), "--keyring", str(ring))
    assert res.exit_code == 1 and f"made by key sha256:{fp[:16]}, which is not trusted" in res.output


def test_env_public_key_and_the_repository_keyring(tmp_path, pkg, keys, monkeypatch):
    monkeypatch.setenv("LATHE_PUBLIC_KEY", str(keys["other_pub"]))
    assert "$LATHE_PUBLIC_KEY" in resolve_trust(pkg).source
    assert cli("verify", str(pkg)).exit_code == 1
    monkeypatch.delenv("LATHE_PUBLIC_KEY")
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    assert cli("keys", "add", str(keys["pub"]), "--keyring", str(repo / ".lathe" / "trusted-keys")).exit_code == 0
    monkeypatch.chdir(repo)
    res = cli("verify", str(pkg))
    assert res.exit_code == 0 and f"keyring {repo / '.lathe' / 'trusted-keys'}" in res.output


# --- class 2: bound to target and version


def test_a_package_renamed_to_another_target_fails_binding(tmp_path, pkg, keys):
    other = pkg.parent / "line-pc"
    pkg.rename(other)
    res = cli("verify", str(other), "--public-key", str(keys["pub"]))
    assert res.exit_code == 1
    bad = failed(verify(other, keys["pub"]))
    assert set(bad) == {"binding"}
    assert "the manifest says target 'edge' but the package is named 'line-pc'" in bad["binding"]
    write_archive(other, tmp_path / "line-pc.tar.gz", mtime=0)
    assert "binding" in failed(verify(tmp_path / "line-pc.tar.gz", keys["pub"]))


def test_target_option_and_package_id_pin_refuse_a_rollback(tmp_path, keys):
    old = build_package(tmp_path / "old", keys["priv"], seed=1, build_time="2024-01-01T00:00:00Z")
    new = build_package(tmp_path / "new", keys["priv"], seed=2, build_time="2024-06-01T00:00:00Z")
    new_id = json.loads((new / "manifest.json").read_text())["package_id"]
    assert verify(new, keys["pub"], package_id=new_id, target="edge").ok
    bad = failed(verify(old, keys["pub"], package_id=new_id))
    assert set(bad) == {"binding"} and f"expected package {new_id} (--package-id)" in bad["binding"]
    res = cli("verify", str(old), "--public-key", str(keys["pub"]), "--package-id", new_id)
    assert res.exit_code == 1 and "an older or another build" in res.output
    bad = failed(verify(new, keys["pub"], target="line-pc"))
    assert set(bad) == {"binding"} and "expected target 'line-pc' (--target)" in bad["binding"]


# --- class 3: nothing runs on unverified input


def test_rebuild_is_never_attempted_when_the_signature_fails(tmp_path, pkg, keys):
    (pkg / "model_card.md").write_text("edited\n")
    report = verify(pkg, keys["pub"], rebuild=True, repo=tmp_path / "no-repo-needed")
    assert report.status_of("self-test") == "SKIP" and report.status_of("rebuild") == "SKIP"
    assert "nothing the package names (its commit, its code) is run" in report.checks[-1].message


def test_selftest_npz_with_an_object_array_is_refused_before_loading(pkg, keys):
    np.savez(pkg / "selftest.npz", images=np.array([object()], dtype=object), logits=np.zeros(1))
    reseal(pkg, keys["priv"])
    report = verify(pkg, keys["pub"])
    assert set(failed(report)) == {"self-test"}
    assert "selftest.npz: images is object; expected uint8" in failed(report)["self-test"]


def test_selftest_with_wrong_expected_outputs_fails(pkg, keys):
    with np.load(pkg / "selftest.npz") as npz:
        images, expected = npz["images"], npz["logits"]
    (pkg / "selftest.npz").write_bytes(npz_bytes({"images": images, "logits": expected + 0.01}))
    reseal(pkg, keys["priv"])
    assert "differ from the expected ones by more than 0.001" in failed(verify(pkg, keys["pub"]))["self-test"]


# --- the choice of variant under the target's selection policy (issue 13)


def edit_manifest(pkg: Path, private_key: Path, edit) -> None:
    manifest = json.loads((pkg / "manifest.json").read_text())
    edit(manifest)
    write_json(pkg / "manifest.json", manifest)
    reseal(pkg, private_key)


def test_selection_passes_for_the_policys_choice_and_says_how_it_ranked(pkg, keys):
    report = verify(pkg, keys["pub"])
    line = next(c for c in report.checks if c.name == "selection")
    assert line.status == "PASS", line.message
    assert "quantized/student is policy smallest's best (size_bytes ascending" in line.message
    assert "of the 2 listed candidates passing every gate" in line.message


@pytest.mark.parametrize("policy, best", [("most_accurate", "student"), ("fastest", "student")])
def test_a_signed_choice_that_is_not_the_policys_best_fails_selection(pkg, keys, policy, best):
    edit_manifest(pkg, keys["priv"], lambda m: m["target"].update(selection=policy))  # an insider's key
    report = verify(pkg, keys["pub"])
    assert set(failed(report)) == {"selection"}, failed(report)
    assert f"policy {policy}" in failed(report)["selection"] and f"picks {best}" in failed(report)["selection"]
    assert report.status_of("signature") == "PASS"  # intact and signed: only its choice is wrong


def test_a_chosen_variant_that_failed_a_gate_fails_selection(pkg, keys):
    edit_manifest(pkg, keys["priv"], lambda m: m.update(variant="teacher"))
    bad = failed(verify(pkg, keys["pub"]))
    assert set(bad) == {"selection"} and "teacher did not pass every gate" in bad["selection"]


@pytest.mark.parametrize("edit, key", [
    (lambda m: m["target"].update(selection="biggest"), "target.selection"),
    (lambda m: m["selection"][0].update(size_bytes=-1), "selection.0.size_bytes"),
    (lambda m: m["selection"][1].update(failed=["rm -rf"]), "selection.1"),
    (lambda m: m["selection"][1].update(accuracy=2.0), "selection.1.accuracy"),
    (lambda m: m.update(selection=[]), "selection"),
])
def test_a_malformed_selection_fails_the_manifest_schema_in_one_line(pkg, keys, edit, key):
    edit_manifest(pkg, keys["priv"], edit)
    report = verify(pkg, keys["pub"])
    bad = failed(report)
    assert "manifest" in bad and bad["manifest"].startswith(f"manifest.json: {key}"), bad
    assert "\n" not in bad["manifest"] and report.status_of("selection") == "SKIP"


def test_a_package_from_before_selection_policies_gets_a_skip_line(pkg, keys):
    edit_manifest(pkg, keys["priv"], lambda m: (m["target"].pop("selection"), m.pop("selection")))
    report = verify(pkg, keys["pub"])
    assert report.ok, failed(report)
    line = next(c for c in report.checks if c.name == "selection")
    assert line.status == "SKIP" and "not checked" in line.message


# --- class 5: one-line verdicts, bounded values, escaped names


@pytest.mark.parametrize("edit, key", [
    (lambda p: p["decision"].update(threshold=7.5), "decision.threshold"),
    (lambda p: p["normalise"].update(std=-1e30), "normalise.std"),
    (lambda p: p["resize"].update(size=[0, 0]), "resize.size"),
    (lambda p: p["input"].update(shape=["batch", 1, 0, 8]), "input"),
    (lambda p: p["selftest"].update(atol=1e9), "selftest.atol"),
    (lambda p: p.update(class_names=["a"] * 4), "class_names"),
])
def test_a_signed_preprocessing_json_with_absurd_values_fails(pkg, keys, edit, key):
    pre = json.loads((pkg / "preprocessing.json").read_text())
    edit(pre)
    write_json(pkg / "preprocessing.json", pre)
    reseal(pkg, keys["priv"])
    report = verify(pkg, keys["pub"])
    bad = failed(report)
    assert set(bad) == {"preprocessing"} and report.status_of("self-test") == "SKIP"
    assert bad["preprocessing"].startswith("preprocessing.json: ") and (key in bad["preprocessing"] or
                                                                         "Value error" in bad["preprocessing"])


def test_non_finite_numbers_in_a_signed_manifest_are_refused(pkg, keys):
    text = (pkg / "manifest.json").read_text().replace('"accuracy": 0.5', '"accuracy": NaN')
    (pkg / "manifest.json").write_text(text)  # a builder cannot sign this: package_id_of refuses NaN
    bad = failed(verify(pkg, keys["pub"]))
    assert "manifest" in bad and "NaN is not a JSON number" in bad["manifest"]


def test_markup_and_control_characters_from_a_package_are_printed_escaped(pkg, keys):
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["validation"]["summary"] = "[bold red]all good[/] \x1b[2J"
    write_json(pkg / "manifest.json", manifest)
    reseal(pkg, keys["priv"])
    (pkg / "odd\x1b[31mname").write_bytes(b"x")
    res = cli("verify", str(pkg), "--public-key", str(keys["pub"]))
    assert res.exit_code == 1
    assert "odd\\x1b[31mname" in res.output and "\x1b[31m" not in res.output
    res = cli("trace", str(pkg), "--public-key", str(keys["pub"]))
    assert "[bold red]all good[/] \\x1b[2J" in res.output and "\x1b[2J" not in res.output


def test_a_non_utf8_sidecar_is_one_fail_line(tmp_path, pkg, keys):
    write_archive(pkg, tmp_path / "edge.tar.gz", mtime=0)
    (tmp_path / "edge.tar.gz.sha256").write_bytes(b"\xff\xfe\x00 junk")
    res = cli("verify", str(tmp_path / "edge.tar.gz"), "--public-key", str(keys["pub"]))
    assert res.exit_code == 1 and "edge.tar.gz.sha256 is not a sha256 line (not ASCII text)" in res.output


def test_missing_package_and_unreadable_archive(tmp_path, keys):
    res = cli("verify", str(tmp_path / "nope"), "--public-key", str(keys["pub"]))
    assert res.exit_code == 1 and f"error: {tmp_path / 'nope'}: no such package folder or archive" in res.output
    trust = resolve_trust(None, keys["pub"], None, None)
    assert verify_package(tmp_path / "nope", trust).failed()[0].message.endswith("does not exist")  # the API
    (tmp_path / "bad.tar.gz").write_bytes(b"junk")
    bad = failed(verify(tmp_path / "bad.tar.gz", keys["pub"]))
    assert "not a readable tar.gz archive" in bad["archive"]
