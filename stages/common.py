"""Glue every stage shares: argv parsing, params loading, and turning LatheErrors into clean exits."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from lathe.config import Section, load_section
from lathe.errors import LatheError

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
    """Run a stage body; a LatheError becomes a one-message exit 1 naming the stage."""
    logging.basicConfig(level=logging.INFO, format=f"[{stage}] %(message)s", stream=sys.stderr)
    try:
        body()
    except LatheError as exc:
        print(f"[{stage}] FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
