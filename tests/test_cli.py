"""The `lathe` CLI: keys init, verify, trace (exit codes and output)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from typer.testing import CliRunner

from lathe.cli import app
from tests.lathe.test_verify import build_package

runner = CliRunner()


def test_keys_init_creates_then_is_idempotent(tmp_path):
    priv, pub = tmp_path / "k" / "s.pem", tmp_path / "k" / "s.pub"
    args = ["keys", "init", "--private", str(priv), "--public", str(pub)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    before = priv.read_bytes()
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "already exist" in res.output
    assert priv.read_bytes() == before
    pub.unlink()  # half a pair: refuse rather than silently replace the private key
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "refusing to overwrite" in res.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert priv.read_bytes() != before


def _keys(tmp_path: Path) -> tuple[Path, Path]:
    priv, pub = tmp_path / "s.pem", tmp_path / "s.pub"
    assert runner.invoke(app, ["keys", "init", "--private", str(priv), "--public", str(pub)]).exit_code == 0
    return priv, pub


def test_verify_exit_codes(tmp_path):
    priv, pub = _keys(tmp_path)
    pkg = build_package(tmp_path / "p", priv)
    res = runner.invoke(app, ["verify", str(pkg), "--public-key", str(pub)])
    assert res.exit_code == 0, res.output
    assert "ALL CHECKS PASSED" in res.output
    (pkg / "model_card.md").write_text("edited\n")
    res = runner.invoke(app, ["verify", str(pkg), "--public-key", str(pub), "--json"])
    assert res.exit_code == 1
    report = json.loads(res.output)
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert failed == {"hash model_card.md", "signature"}


def test_trace_json_and_table(tmp_path, monkeypatch):
    priv, _ = _keys(tmp_path)
    pkg = build_package(tmp_path / "p", priv, raw_md5="ab" * 16 + ".dir")
    monkeypatch.chdir(tmp_path)  # not a git repo: package-only trace
    res = runner.invoke(app, ["trace", str(pkg), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["raw_data"]["md5"] == "ab" * 16 + ".dir"
    res = runner.invoke(app, ["trace", str(pkg)])
    assert res.exit_code == 0 and "ab" * 16 in res.output and "chain of stage hashes" in res.output


def test_trace_unknown_subject_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["trace", "nonsense"])
    assert res.exit_code == 1 and "not a package folder" in res.output
