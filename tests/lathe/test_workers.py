import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lathe.workers import map_jobs

REPO = Path(__file__).resolve().parents[2]


def square_with_progress(n: int, progress) -> int:
    progress({"n": n, "pid": os.getpid()})
    return n * n


def fail_on_three(n: int, progress) -> int:
    if n == 3:
        raise ValueError("three is bad")
    return n


def test_jobs_run_in_child_processes_and_results_keep_their_order():
    rows = []
    assert map_jobs(square_with_progress, [(n,) for n in range(5)], workers=2, progress=rows.append) == [0, 1, 4, 9, 16]
    assert sorted(r["n"] for r in rows) == list(range(5))
    assert os.getpid() not in {r["pid"] for r in rows}


def test_one_worker_runs_the_jobs_here():
    rows = []
    assert map_jobs(square_with_progress, [(2,), (3,)], workers=1, progress=rows.append) == [4, 9]
    assert {r["pid"] for r in rows} == {os.getpid()}


def test_a_failing_job_raises_its_error_in_the_caller():
    with pytest.raises(ValueError, match="three is bad"):
        map_jobs(fail_on_three, [(1,), (3,)], workers=2)


def test_children_die_when_the_stage_process_is_killed(tmp_path):
    """A SIGKILLed stage must not leave its training children running (the flow retries the stage)."""
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, time
        from lathe.workers import map_jobs

        def sleeper(n, progress):
            with open({str(pids)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(120)

        if __name__ == "__main__":
            map_jobs(sleeper, [(1,), (2,)], workers=2)
    """)
    (tmp_path / "stage.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "stage.py")], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not pids.exists() or len(pids.read_text().split()) < 2):
        time.sleep(0.2)
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in children):
        time.sleep(0.2)
    assert not any(alive(p) for p in children)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead but not yet reaped by its (new) parent
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
