"""Glue every stage shares: argv parsing, params loading, quiet logs, and turning LatheErrors into clean exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from lathe.config import Section, load_section
from lathe.errors import DATA_ERROR_EXIT, ERROR_EXIT, DataError, LatheError, ValidationFailed
from lathe.io import printable, scratch_tempdir, write_text

S = TypeVar("S", bound=Section)
PARAMS_FILE = Path("params.yaml")
VERBOSE_ENV = "LATHE_VERBOSE"
VERBOSE_FLAG = "--verbose"
OWN_LOGGERS = ("lathe", "stages", "flows", "__main__")  # a stage module run with `python -m` logs as __main__
# Library loggers with a handler of their own: torch's pytree warns once per torchao import that an Enum
# "is now natively supported by torch.compile"; torchao notes the CUDA-only kernels it cannot load.
OWN_HANDLER_LOGGERS = ("torch.utils._pytree", "torchao")


def is_verbose() -> bool:
    """Env LATHE_VERBOSE=1 (or `--verbose` on the stage's command line, which sets it: configure_warnings)."""
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def configure_warnings() -> bool:
    """Keep library warnings and chatter (torch, onnx, onnxscript, onnxruntime: UserWarning,
    DeprecationWarning, FutureWarning, their loggers' warnings and notes) out of stage logs unless
    verbose; True when verbose.

    Verbose is env LATHE_VERBOSE=1 or `--verbose` anywhere on a stage's command line (taken out of
    sys.argv here, so no stage parser needs to know it). Runs when `stages` is imported, before any
    stage module imports a library, so import-time warnings are covered too. Verbose shows every
    warning once per place through the stage's log; quiet drops them, sets torch.onnx's logger to
    errors (TORCH_LOGS, read when torch loads; a TORCH_LOGS of the user's own is kept), and `run`
    shows only this project's log records (and any library's errors).
    """
    if VERBOSE_FLAG in sys.argv[1:]:
        sys.argv = [a for a in sys.argv if a != VERBOSE_FLAG]
        os.environ[VERBOSE_ENV] = "1"
    if is_verbose():
        warnings.simplefilter("default")
        logging.captureWarnings(True)
        return True
    warnings.simplefilter("ignore")
    os.environ.setdefault("TORCH_LOGS", "-onnx")  # "torchvision is not installed. Skipping torchvision::nms" x4
    return False


def _own_or_error(record: logging.LogRecord) -> bool:
    """This project's records, and any library's errors (onnxruntime's quantizer logs on the root logger)."""
    return record.name.split(".")[0] in OWN_LOGGERS or record.levelno >= logging.ERROR


def parse_args(description: str, argv: Sequence[str] | None, *names: str, section: str | None = None) -> argparse.Namespace:
    """Positional path arguments named `names`, plus --params (default params.yaml).

    With `section`, also --section (default `section`): the params section to read, so one stage
    module can serve two dvc.yaml entries with their own settings.
    """
    parser = argparse.ArgumentParser(description=description)
    for name in names:
        parser.add_argument(name, type=Path)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    if section is not None:
        parser.add_argument("--section", default=section, help=f"params section to read (default {section})")
    return parser.parse_args(argv)


def section(args: argparse.Namespace, name: str, model: type[S]) -> S:
    """The stage's own validated params section."""
    return load_section(args.params, name, model)


TRACEBACK_DIR = Path(".lathe") / "logs"  # under the repo root; git-ignored


def run(stage: str, body: Callable[[], None]) -> None:
    """Run a stage body in its own scratch temp folder (lathe.io.scratch_tempdir, under the repo
    root DVC runs stages in). Every failure ends in one message naming the stage: a LatheError with
    status DATA_ERROR_EXIT for bad input data, ERROR_EXIT otherwise; an OSError (a full disk, a
    permission) names the file; anything else names the error and the file holding its traceback
    (printed too with LATHE_DEBUG=1)."""
    logging.basicConfig(level=logging.INFO, format=f"[{stage}] %(message)s", stream=sys.stderr)
    if not is_verbose():  # library notes (onnxscript's passes, onnxruntime's quantizer) only when verbose
        for handler in logging.getLogger().handlers:
            handler.addFilter(_own_or_error)
        for name in OWN_HANDLER_LOGGERS:  # they print through their own handlers, past the filter above
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with scratch_tempdir(Path.cwd(), stage):
            body()
    except LatheError as exc:
        print(f"[{stage}] FAILED: {exc}", file=sys.stderr)
        sys.exit(DATA_ERROR_EXIT if isinstance(exc, (DataError, ValidationFailed)) else ERROR_EXIT)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"[{stage}] FAILED: {exc.strerror or exc}{where}{_keep_traceback(stage)}", file=sys.stderr)
        sys.exit(ERROR_EXIT)
    except Exception as exc:
        print(f"[{stage}] FAILED: unexpected {type(exc).__name__}: {printable(str(exc), 500)}{_keep_traceback(stage)}",
              file=sys.stderr)
        sys.exit(ERROR_EXIT)


def _keep_traceback(stage: str) -> str:
    """Save the current traceback under .lathe/logs/ (print it with LATHE_DEBUG=1); the note to append."""
    text = traceback.format_exc()
    if os.environ.get("LATHE_DEBUG") == "1":
        print(text, file=sys.stderr)
    try:
        path = TRACEBACK_DIR / f"{stage.replace('@', '-').replace('/', '-')}.traceback.txt"
        write_text(path, text)
    except OSError:
        return ""
    return f" (traceback in {path})"


class EpochClock:
    """Elapsed time and a rough time left for a stage that runs `total` epochs (over all networks)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = max(total, 1), 0, time.monotonic()

    def tick(self) -> str:
        """Count one finished epoch; '(12/50, 1m40s elapsed, ~5m10s left)'."""
        self.done += 1
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * max(self.total - self.done, 0)
        return f"({self.done}/{self.total}, {_minutes(elapsed)} elapsed, ~{_minutes(left)} left)"


def epoch_progress(log: logging.Logger, epochs: int) -> Callable[[dict], None]:
    """A `fit` progress callback logging each epoch's loss, val figures and time left."""
    clock = EpochClock(epochs)

    def progress(row: dict) -> None:
        log.info("epoch %3d/%d  loss %.4f  val acc %.4f  bal %.4f  def-recall %.4f  %s", row["epoch"], epochs,
                 row["train_loss"], row["val_accuracy"], row["val_balanced_accuracy"], row["val_defective_recall"],
                 clock.tick())

    return progress


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
