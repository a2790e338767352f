"""The `lathe` command line: the only user-facing module inside the core package."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from lathe.errors import LatheError

app = typer.Typer(help="Lathe: compress plant-floor models and keep the evidence auditors ask for.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Bring data into the raw layout (images/*.png + labels.csv).", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)


def fail(exc: LatheError) -> None:
    """Print a LatheError's message and exit 1."""
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(1)


def refuse_non_empty(dest: Path) -> None:
    """Never mix a new import into existing raw data."""
    if dest.exists() and any(dest.iterdir()):
        console.print(f"[bold red]error:[/] {dest} is not empty; import into an empty folder")
        raise typer.Exit(1)


@data_app.command("import-elpv")
def import_elpv_cmd(dest: Path = typer.Argument(..., help="raw-layout folder to create, e.g. data/raw")) -> None:
    """Write the ELPV solar-cell dataset (from the installed elpv-dataset package) into DEST."""
    from lathe.data import import_elpv

    refuse_non_empty(dest)
    try:
        with console.status("copying ELPV images"):
            n = import_elpv(dest)
    except LatheError as exc:
        fail(exc)
    console.print(f"imported {n} ELPV samples into {dest}")


@data_app.command("generate")
def generate_cmd(
    dest: Path = typer.Argument(..., help="raw-layout folder to create"),
    per_class_type: int = typer.Option(6, min=1, help="images per class and cell type"),
    size: int = typer.Option(48, min=16, help="image side in px"),
    seed: int = typer.Option(0),
) -> None:
    """Write a small deterministic synthetic dataset in the raw layout (for tests and demos)."""
    from lathe.data import generate_raw

    refuse_non_empty(dest)
    n = generate_raw(dest, per_class_type=per_class_type, size=size, seed=seed)
    console.print(f"generated {n} synthetic samples into {dest}")


if __name__ == "__main__":
    app()
