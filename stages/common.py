"""Glue every stage shares: argv parsing, params loading, and turning LatheErrors into clean exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from lathe.config import Section, load_section
from lathe.errors import DATA_ERROR_EXIT, ERROR_EXIT, DataError, LatheError, ValidationFailed
from lathe.io import printable, scratch_tempdir, write_text

S = TypeVar("S", bound=Section)
PARAMS_FILE = Path("params.yaml")


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


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
