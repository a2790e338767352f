"""Glue every stage shares: argv parsing, params loading, and turning LatheErrors into clean exits."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from lathe.config import Section, load_section
from lathe.errors import DATA_ERROR_EXIT, ERROR_EXIT, DataError, LatheError, ValidationFailed
from lathe.io import scratch_tempdir

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


def run(stage: str, body: Callable[[], None]) -> None:
    """Run a stage body in its own scratch temp folder (lathe.io.scratch_tempdir, under the repo
    root DVC runs stages in); a LatheError becomes a one-message exit naming the stage: status
    DATA_ERROR_EXIT for bad input data, ERROR_EXIT otherwise."""
    logging.basicConfig(level=logging.INFO, format=f"[{stage}] %(message)s", stream=sys.stderr)
    try:
        with scratch_tempdir(Path.cwd(), stage):
            body()
    except LatheError as exc:
        print(f"[{stage}] FAILED: {exc}", file=sys.stderr)
        sys.exit(DATA_ERROR_EXIT if isinstance(exc, (DataError, ValidationFailed)) else ERROR_EXIT)
