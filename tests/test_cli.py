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


def _installed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The venv's `lathe` executable with its output into pipes, on a narrow 'terminal' (COLUMNS=60)."""
    import os

    env = {**os.environ, "COLUMNS": "60"}
    return subprocess.run([str(Path(sys.executable).parent / "lathe"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_a_missing_package_path_is_named_with_its_near_match(tmp_path):
    priv, pub, _ = _keys(tmp_path)
    build_package(tmp_path / "models" / "packages", priv, target="line-pc")
    for command in ("trace", "verify"):
        res = _installed(command, "models/packages/line_pc", "--public-key", str(pub), cwd=tmp_path)
        assert res.returncode == 1 and res.stdout == "", (command, res.stdout)
        [line] = res.stderr.strip().splitlines()
        assert line.startswith("error: models/packages/line_pc: no such package folder"), line
        assert line.endswith("did you mean models/packages/line-pc?"), line
    res = _installed("verify", "models/packages/nothing-like-it", cwd=tmp_path)
    assert res.returncode == 1 and "did you mean" not in res.stderr and "no such package" in res.stderr


def test_piped_trace_and_verify_keep_every_hash_whole_on_one_line(tmp_path):
    """Into a pipe, on a narrow terminal, no 64-hex sha256 (or md5) is wrapped or cut."""
    import re

    priv, pub, _ = _keys(tmp_path)
    pkg = build_package(tmp_path / "p", priv)
    hashes = set(re.findall(r"\b[0-9a-f]{32}(?:[0-9a-f]{32})?\b", (pkg / "manifest.json").read_text()))
    for command in ("trace", "verify"):
        res = _installed(command, str(pkg), "--public-key", str(pub), cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        lines = res.stdout.splitlines()
        shown = [h for h in hashes if h[:12] in res.stdout]
        assert any(len(h) == 64 for h in shown), (command, res.stdout)  # the check cannot pass on no hash
        for h in shown:  # whole on one line, or shortened on purpose ("dddddddddddddddd...")
            whole = any(h in line for line in lines)
            assert whole or re.search(rf"{h[:12]}[0-9a-f]*(\.\.\.|…)", res.stdout), (command, h, res.stdout)
        runs = re.findall(r"[0-9a-f]{20,}", res.stdout)
        assert all(len(r) in (32, 40, 64) for r in runs), (command, sorted({len(r) for r in runs}))
