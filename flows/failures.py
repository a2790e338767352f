"""Why a stage failed: reading a failed `dvc repro --single-item <stage>` and classifying it.

A data failure (the `validate` stage, or a stage exiting with DATA_ERROR_EXIT) is never retried; a
transient failure (a killed process, DVC's repo lock or a path's lock held) is retried `ops.retries`
times; anything else ("error") fails at once. Nothing here imports prefect or dvc.
"""

from __future__ import annotations

import re
import signal
from typing import Any

from lathe.errors import DATA_ERROR_EXIT  # a stage's exit status for bad input data

FAILURE_KINDS = ("data", "transient", "error")
VALIDATION_STAGES = frozenset({"validate"})  # a non-zero exit of these is a data failure
LOCK_HELD = "Unable to acquire lock"  # dvc/lock.py: another DVC process holds the repo lock
OUT_BUSY = "is busy, it is being blocked by"  # dvc/rwlock.py: another DVC process reads/writes that path
# dvc/stage/exceptions.py: "failed to run: <cmd>, exited with <status>" (negative: killed by a signal)
_CMD_EXIT = re.compile(r"exited with (-?\d+)")
# A POSIX shell (DVC runs commands through $SHELL, else /bin/sh) reports a child killed by signal N
# as 128+N; without the shell in between, Python sees -N. SIGKILL (the OOM killer, a preempted
# node) and SIGTERM (a stopped container) are transient; SIGINT (a user's Ctrl-C) is not.
_TRANSIENT_SIGNALS = (signal.SIGKILL, signal.SIGTERM)
# stages/common.py: `[<stage>] FAILED: <message>` on stderr, then exit 1
_STAGE_FAILED = re.compile(r"^\[[^\]]+\] FAILED: ")


def stage_record(stage: str, returncode: int, seconds: float, status: str) -> dict[str, Any]:
    """One stage's result as the flow returns it (a small JSON dict); StageFailed.record() is the failed one."""
    return {
        "stage": stage,
        "returncode": returncode,
        "seconds": round(seconds, 3),
        "status": status,  # ran | restored | verified | skipped | failed | unknown
        "ran": status == "ran",
    }


class StageFailed(RuntimeError):
    """A stage exited non-zero. `message` is the stage's own "[stage] FAILED: ..." line when it printed one.

    `kind` is one of FAILURE_KINDS: "data" (bad input data; never retried), "transient" (killed
    process or held lock; retried as ops params say) or "error" (anything else; not retried).
    """

    def __init__(self, stage: str, message: str, returncode: int = 1, seconds: float = 0.0,
                 kind: str = "error") -> None:
        # All state in args, so the exception pickles and copies cleanly.
        super().__init__(stage, message, returncode, seconds, kind)
        self.stage, self.message, self.returncode, self.seconds = stage, message, returncode, seconds
        self.kind = kind

    def __str__(self) -> str:
        return f"stage '{self.stage}' failed: {self.message}"

    def record(self) -> dict[str, Any]:
        return stage_record(self.stage, self.returncode, self.seconds, "failed") | {"message": self.message,
                                                                                   "kind": self.kind}


def stage_exit_code(stderr: str) -> int | None:
    """The stage command's own exit status from DVC's "failed to run: ..., exited with N" line."""
    codes = _CMD_EXIT.findall(stderr)
    return int(codes[-1]) if codes else None


def killed_by_signal(code: int | None) -> bool:
    """Whether a command's exit status means it was killed: -N from Python, 128+N from a shell."""
    if code is None:
        return False
    return code < 0 or code in {128 + int(sig) for sig in _TRANSIENT_SIGNALS}


def classify_failure(stage: str, returncode: int, stderr: str) -> str:
    """"data", "transient" or "error" for a failed `dvc repro --single-item <stage>`.

    data: the validation stage failed, or the command exited DATA_ERROR_EXIT.
    transient: `dvc` itself or the stage command was killed by a signal (negative status, or
    128+SIGKILL/SIGTERM when a shell sat in between), or the
    DVC repo lock (or a path's read/write lock) was held by another process.
    """
    cmd_code = stage_exit_code(stderr)
    if returncode < 0 or killed_by_signal(cmd_code) or LOCK_HELD in stderr or OUT_BUSY in stderr:
        return "transient"
    if stage.split("@", 1)[0] in VALIDATION_STAGES or cmd_code == DATA_ERROR_EXIT:
        return "data"
    return "error"


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn: retry only StageFailed of kind "transient"."""
    exc = getattr(state, "data", None)
    return isinstance(exc, StageFailed) and exc.kind == "transient"


def failure_message(stderr: str, returncode: int) -> str:
    """The stage's "[stage] FAILED: ..." line (plus continuation lines), else DVC's last ERROR line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    # at line start only: DVC's own ERROR line quotes the command, which may contain "FAILED:"
    failed = [i for i, line in enumerate(lines) if _STAGE_FAILED.match(line)]
    if failed:
        tail = lines[failed[-1] :]
        end = next((i for i, line in enumerate(tail) if line.startswith("ERROR: ")), len(tail))
        return "\n".join(tail[:end])
    errors = [line for line in lines if line.startswith("ERROR: ")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"dvc repro exited with {returncode}"
