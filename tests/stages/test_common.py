"""stages.common: a real stage's stderr holds its own log lines only, unless verbose (library warnings then shown)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny import make_prepared, offline_env, tiny_params

# A Python warning as logged ("...: FutureWarning: ..."), torch's own logger ("W1203 09:55:41.546000 ..."),
# or a library's chatter that reaches the stage's handler (onnxscript's optimizer passes).
WARNING_LINE = re.compile(r"\w+Warning\b|^[WE]\d{4} \d\d:\d\d|^\[\w+\] (Removed \d+ unused nodes|No unused functions)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with tiny prepared data and params: the train_teacher stage (it exports ONNX, the noisy part)."""
    root = tmp_path_factory.mktemp("quiet")
    make_prepared(root)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(train_teacher={"epochs": 1})))
    return root


def run_stage(workdir: Path, name: str, *extra: str, verbose_env: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in offline_env().items() if k not in ("LATHE_VERBOSE", "TORCH_LOGS", "PYTHONWARNINGS")}
    if verbose_env:
        env["LATHE_VERBOSE"] = "1"
    cmd = [sys.executable, "-m", "stages.train_teacher", "prepared", f"teacher_{name}", f"{name}.csv", *extra]
    res = subprocess.run(cmd, check=False, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (workdir / f"teacher_{name}" / "model.onnx").is_file()
    return res


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if WARNING_LINE.search(line)]


def test_a_stage_logs_no_library_warnings_by_default(workdir):
    res = run_stage(workdir, "quiet")

    assert warning_lines(res.stderr) == [], res.stderr
    assert "[train_teacher] ONNX export matches torch" in res.stderr  # the stage's own lines stay
    assert "[train_teacher] epoch   1/1" in res.stderr


@pytest.mark.parametrize("how", ["env", "flag"])
def test_verbose_shows_the_library_warnings(workdir, how):
    res = run_stage(workdir, how, *(["--verbose"] if how == "flag" else []), verbose_env=how == "env")

    shown = warning_lines(res.stderr)
    assert any("Warning" in line for line in shown) and any(line.startswith("W") for line in shown), res.stderr
    assert "[train_teacher] ONNX export matches torch" in res.stderr


def test_quiet_and_verbose_runs_write_the_same_model(workdir):
    """Logging settings never reach a model's bytes (the runs above trained from the same data and params)."""
    names = [n for n in ("quiet", "env", "flag") if (workdir / f"teacher_{n}" / "model.onnx").is_file()]
    if len(names) < 2:
        pytest.skip("needs the stage runs above (run the module as a whole)")
    digests = {(workdir / f"teacher_{n}" / "model.onnx").read_bytes() for n in names}
    assert len(digests) == 1


def test_the_verbose_flag_is_taken_out_of_argv_and_sets_the_env(monkeypatch):
    from stages.common import VERBOSE_ENV, configure_warnings

    monkeypatch.setattr(sys, "argv", ["stage", "a", "--verbose", "b"])
    # setenv records the variable's state before the test, which teardown restores; a delenv of an
    # absent variable records nothing, and a later one would restore the "1" set here (it leaked
    # into every stage this worker started afterwards)
    monkeypatch.setenv(VERBOSE_ENV, "")
    try:
        assert configure_warnings() is True
        assert sys.argv == ["stage", "a", "b"] and os.environ[VERBOSE_ENV] == "1"
    finally:
        os.environ.pop(VERBOSE_ENV, None)
        configure_warnings()  # back to this process's quiet default
        logging.captureWarnings(False)
