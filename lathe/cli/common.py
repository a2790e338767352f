"""What every `lathe` command shares: the consoles, one-line errors, and finding the repository.

Nothing here imports flows, DVC or Prefect: `lathe --help` stays fast.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from lathe.errors import LatheError
from lathe.io import printable

# Wider than any line: into a file or a pipe, rich never wraps (a hash stays whole on its line).
UNWRAPPED = 100_000
DVC_FILE = "dvc.yaml"

state = {"debug": False}


def command_group(**kwargs: Any) -> typer.Typer:
    """A Typer app with plain help: every default shown as `[default: ...]`, a flag without a type column
    (rich help would print `--json <bool>`), the help text verbatim (rich markup would eat `[default: ...]`)."""
    return typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False,
                       context_settings={"max_content_width": 120}, **kwargs)


def make_console(stderr: bool) -> Console:
    """The terminal's width on a terminal; never wrapped into a file or a pipe (soft wrap, huge width)."""
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, highlight=False, width=None if tty else UNWRAPPED, soft_wrap=not tty)


console = make_console(stderr=True)  # messages, progress, errors


def output_console() -> Console:
    """Standard output (results), made when needed so that it follows redirections done after import."""
    return make_console(stderr=False)


def fail(message: str) -> None:
    """Print one `error:` line (control characters escaped) to standard error."""
    console.print(f"error: {printable(message, 2000)}", markup=False)


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every failure of a command into one `error:` line and exit 1 (the traceback with --debug)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except LatheError as exc:
            _debug_traceback()
            fail(str(exc))
        except OSError as exc:  # a full disk, a permission, a vanished file: say which
            _debug_traceback()
            where = f" ({printable(exc.filename)})" if exc.filename else ""
            console.print(f"error: {exc.strerror or exc}{where}", markup=False)
        except Exception as exc:
            _debug_traceback()
            console.print(f"error: unexpected {type(exc).__name__}: {printable(str(exc), 300)} "
                          "(rerun with `lathe --debug ...` for the traceback)", markup=False)
        raise typer.Exit(1)

    return run


def _debug_traceback() -> None:
    if state["debug"]:
        console.print(traceback.format_exc(), markup=False)


def show_debug(tracebacks: list[str]) -> None:
    if state["debug"]:
        for tb in tracebacks:
            console.print(tb, markup=False, highlight=False)


def find_repo(repo: Path | None) -> Path:
    """`repo`, else the git work tree around the working directory (so any sub-folder works), resolved.

    Raises LatheError when the folder holds no dvc.yaml (not a Lathe repository).
    """
    from lathe.audit.trust import git_toplevel

    root = (repo if repo is not None else git_toplevel(Path.cwd()) or Path.cwd()).resolve()
    if not (root / DVC_FILE).is_file():
        how = "--repo" if repo is not None else "the working directory's git work tree"
        raise LatheError(f"{root}: no {DVC_FILE} here ({how}); run inside a Lathe repository or pass --repo PATH")
    return root
