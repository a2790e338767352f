import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lathe.io import (
    SCRATCH_DIR,
    atomic_path,
    load_arrays,
    pid_alive,
    read_json,
    remove_dead_scratch,
    remove_dead_temps_under,
    save_arrays,
    scratch_tempdir,
    sha256_file,
    write_json,
)

ROOT = Path(__file__).resolve().parents[2]


def run_and_get_killed(code: str) -> int:
    """Run `code` in a child Python, where `die()` prints the pid and SIGKILLs the child; returns that
    (now dead) pid."""
    prelude = ("import os, signal\n"
               "def die():\n    print(os.getpid(), flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    script = prelude + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    return int(proc.stdout.split()[-1])


def killed_stage_scratch(root: Path, stage: str = "quantize") -> Path:
    """What a stage SIGKILLed inside `scratch_tempdir` leaves: its scratch folder with a temp dir in it."""
    pid = run_and_get_killed(f"""
        import tempfile
        from pathlib import Path
        from lathe.io import scratch_tempdir
        with scratch_tempdir(Path({str(root)!r}), {stage!r}):
            Path(tempfile.mkdtemp(prefix="pre.quant.")).joinpath("model.onnx").write_bytes(b"x" * 100)
            die()
    """)
    left = root / SCRATCH_DIR / f"{stage}-{pid}"
    assert left.is_dir() and any(left.iterdir())
    return left


def test_atomic_write_leaves_old_file_and_no_temp_on_error(tmp_path):
    dest = tmp_path / "out.json"
    write_json(dest, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert read_json(dest) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_removes_what_a_killed_writer_left(tmp_path):
    dest = tmp_path / "metrics.json"
    pid = run_and_get_killed(f"""
        from pathlib import Path
        from lathe.io import atomic_path
        with atomic_path(Path({str(dest)!r})) as tmp:
            tmp.write_text("half")
            die()
    """)
    [left] = tmp_path.iterdir()
    assert left.name.startswith(f".metrics.json.{pid}.") and left.name.endswith(".tmp")
    live = tmp_path / f".metrics.json.{os.getpid()}.abcdefgh.tmp"  # a live writer's temp stays
    live.write_text("busy")

    write_json(dest, {"a": 1})

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "metrics.json"])


def test_dead_temps_anywhere_in_the_workspace_are_found_and_live_ones_kept(tmp_path):
    dead = run_and_get_killed("die()")
    staging = tmp_path / "models" / "packages" / f".gw.{dead}.abcd1234.tmp"  # a killed package build
    (staging / "gw").mkdir(parents=True)
    (staging / "gw" / "model.onnx").write_bytes(b"half")
    report = tmp_path / "reports" / "student" / f".metrics.json.{dead}.zz_9abcd.tmp"
    report.parent.mkdir(parents=True)
    report.write_text("{")
    live = tmp_path / "reports" / f".compare.json.{os.getpid()}.abcdefgh.tmp"
    live.write_text("busy")
    hidden = tmp_path / ".git" / f".x.{dead}.abcdefgh.tmp"  # hidden top-level folders are not searched
    hidden.parent.mkdir()
    hidden.write_text("")

    assert sorted(remove_dead_temps_under(tmp_path)) == sorted([staging, report])

    assert not staging.exists() and not report.exists() and live.exists() and hidden.exists()


def test_scratch_tempdir_is_the_temp_folder_for_the_block_and_is_removed(tmp_path):
    before = (tempfile.gettempdir(), os.environ.get("TMPDIR"))
    with scratch_tempdir(tmp_path, "quantize") as scratch:
        assert scratch == tmp_path.resolve() / SCRATCH_DIR / f"quantize-{os.getpid()}"
        made = Path(tempfile.mkdtemp())
        assert made.parent == scratch and os.environ["TMPDIR"] == str(scratch)
        child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                               capture_output=True, text=True, check=True)
        assert child.stdout.strip() == str(scratch)  # children (through TMPDIR) too
    assert not scratch.exists()
    assert (tempfile.gettempdir(), os.environ.get("TMPDIR")) == before


def test_a_killed_stages_scratch_is_removed_by_the_next_one_and_live_ones_are_kept(tmp_path):
    dead = killed_stage_scratch(tmp_path)
    live = tmp_path / SCRATCH_DIR / f"distill-{os.getppid()}"  # the pytest parent: alive
    live.mkdir()
    assert not pid_alive(int(dead.name.rsplit("-", 1)[1])) and pid_alive(os.getppid())

    with scratch_tempdir(tmp_path, "evaluate"):
        assert not dead.exists() and live.is_dir()
    assert remove_dead_scratch(tmp_path) == []
    assert live.is_dir()


def test_json_is_byte_stable(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, 2]})
    write_json(tmp_path / "b.json", {"a": [1.5, 2], "b": 1})
    assert sha256_file(tmp_path / "a.json") == sha256_file(tmp_path / "b.json")


def test_arrays_round_trip(tmp_path):
    arrays = {"x": np.arange(12, dtype=np.uint8).reshape(3, 4), "y": np.array([1, 2], dtype=np.int64)}
    save_arrays(tmp_path / "a.safetensors", arrays, {"k": "v"})
    back = load_arrays(tmp_path / "a.safetensors")
    assert set(back) == {"x", "y"}
    np.testing.assert_array_equal(back["x"], arrays["x"])
