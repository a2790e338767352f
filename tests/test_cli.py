"""The `lathe` CLI: keys, verify and trace exit codes, one-line errors, unwrapped output for pipes."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from lathe.cli import app
from tests.packages import build_package

runner = CliRunner()


def test_keys_init_creates_trusts_then_is_idempotent(tmp_path):
    priv, pub, ring = tmp_path / "k" / "s.pem", tmp_path / "k" / "s.pub", tmp_path / "ring"
    args = ["keys", "init", "--private", str(priv), "--public", str(pub), "--keyring", str(ring)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert len(list(ring.glob("*.pub"))) == 1 and "trusted in" in res.output
    before = priv.read_bytes()
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "already exist" in res.output
    assert priv.read_bytes() == before
    pub.unlink()  # half a pair: refuse rather than silently replace the private key
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "refusing to overwrite" in res.output and "Traceback" not in res.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert priv.read_bytes() != before
    assert len(list(ring.glob("*.pub"))) == 2  # rotation: the old key stays trusted until removed


def _keys(tmp_path: Path) -> tuple[Path, Path, Path]:
    priv, pub, ring = tmp_path / "s.pem", tmp_path / "s.pub", tmp_path / "ring"
    res = runner.invoke(app, ["keys", "init", "--private", str(priv), "--public", str(pub), "--keyring", str(ring)])
    assert res.exit_code == 0
    return priv, pub, ring


def test_keys_list_and_export(tmp_path):
    _, pub, ring = _keys(tmp_path)
    res = runner.invoke(app, ["keys", "list", "--keyring", str(ring)])
    assert res.exit_code == 0 and res.output.count("sha256:") == 1
    res = runner.invoke(app, ["keys", "export", "--public", str(pub), "--out", str(tmp_path / "give.pub")])
    assert res.exit_code == 0 and (tmp_path / "give.pub").read_bytes() == pub.read_bytes()
    assert "fingerprint sha256:" in res.output
    assert runner.invoke(app, ["keys", "list", "--keyring", str(tmp_path / "empty")]).exit_code == 1


def test_verify_exit_codes_and_json(tmp_path):
    priv, pub, _ = _keys(tmp_path)
    pkg = build_package(tmp_path / "p", priv)
    res = runner.invoke(app, ["verify", str(pkg), "--public-key", str(pub)])
    assert res.exit_code == 0, res.output
    assert "ALL CHECKS PASSED" in res.output
    (pkg / "model_card.md").write_text("edited\n")
    res = runner.invoke(app, ["verify", str(pkg), "--public-key", str(pub), "--json"])
    assert res.exit_code == 1
    report = json.loads(res.output)
    failed = {c["name"] for c in report["checks"] if c["status"] == "FAIL"}
    assert failed == {"hash model_card.md", "signature"}


def test_trace_json_and_the_default_view(tmp_path, monkeypatch):
    priv, pub, _ = _keys(tmp_path)
    pkg = build_package(tmp_path / "p", priv, raw_md5="ab" * 16 + ".dir")
    monkeypatch.chdir(tmp_path)  # not a git repo: package-only trace
    res = runner.invoke(app, ["trace", str(pkg), "--json", "--public-key", str(pub)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["raw_data"]["md5"] == "ab" * 16 + ".dir" and out["params"] == {"ingest": {"image_size": 8}}
    res = runner.invoke(app, ["trace", str(pkg), "--public-key", str(pub)])
    assert res.exit_code == 0 and "ab" * 16 in res.output and "chain of stage hashes" in res.output
    assert "params.ingest" not in res.output and "--params" in res.output
    assert "params.ingest" in runner.invoke(app, ["trace", str(pkg), "--params", "--public-key", str(pub)]).output


def test_unknown_subject_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["trace", "nonsense"])
    assert res.exit_code == 1 and res.output.startswith("error: nonsense: no such package folder")
    assert len(res.output.strip().splitlines()) == 1


def test_installed_cli_output_to_a_pipe_is_not_wrapped(tmp_path):
    """Piped to a file, trace keeps every hash on one line (rich would wrap at 80 columns)."""
    priv, pub, _ = _keys(tmp_path)
    pkg = build_package(tmp_path / "p", priv)
    lathe = Path(sys.executable).parent / "lathe"
    res = subprocess.run([str(lathe), "trace", str(pkg), "--public-key", str(pub)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert any(manifest["files"]["model.onnx"] in line for line in res.stdout.splitlines())
    assert max(len(line) for line in res.stdout.splitlines()) > 80
    res = subprocess.run([str(lathe), "verify", str(tmp_path / "missing")], capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr + res.stdout


def test_version_names_lathe_and_its_main_libraries():
    import lathe

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output.startswith(f"lathe {lathe.__version__} (torch ") and "onnxruntime" in res.output
