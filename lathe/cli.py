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


keys_app = typer.Typer(help="The package signing key pair (EC P-256, offline).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init_cmd(
    private: Path = typer.Option(Path(".lathe/keys/signing-key.pem"), "--private", help="private key (PEM, mode 0600)"),
    public: Path = typer.Option(Path(".lathe/keys/signing-key.pub"), "--public", help="public key (PEM) to give verifiers"),
    force: bool = typer.Option(False, "--force", help="replace existing keys (old packages stop verifying)"),
) -> None:
    """Create the signing key pair; does nothing when both files already exist."""
    from lathe.ship.signing import generate_keys

    if private.exists() and public.exists() and not force:
        console.print(f"keys already exist: {private} (private), {public} (public); nothing to do")
        return
    try:
        generate_keys(private, public, force=force)
    except LatheError as exc:
        fail(exc)
    console.print(f"wrote {private} (private, 0600; keep it out of git) and {public} (public)")


@app.command("verify")
def verify_cmd(
    package: Path = typer.Argument(..., help="package folder or <target>.tar.gz"),
    public_key: Path = typer.Option(None, "--public-key", help="public key [default: $LATHE_PUBLIC_KEY or "
                                    ".lathe/keys/signing-key.pub in --repo]"),
    rebuild: bool = typer.Option(False, "--rebuild", help="rebuild at the recorded commit and compare every file"),
    full: bool = typer.Option(False, "--full", help="with --rebuild: rerun every stage from raw data, not only package"),
    repo: Path = typer.Option(None, "--repo", help="git + DVC repository for --rebuild [default: cwd]"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable report on stdout"),
) -> None:
    """Re-hash, check the signature, run the self-test (and optionally rebuild). Exit 0 only if all pass."""
    import json

    from rich.table import Table

    from lathe.audit.verify import default_public_key, verify_package

    key = public_key or default_public_key(repo)
    with console.status("verifying"):
        report = verify_package(package, key, rebuild=rebuild, repo=repo, full=full)
    if json_out:
        typer.echo(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        out = Console()
        table = Table(title=f"verify {package}", show_lines=False)
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        for c in report.checks:
            table.add_row(c.name, "[green]PASS[/]" if c.passed else "[bold red]FAIL[/]", c.message)
        out.print(table)
        out.print("[bold green]ALL CHECKS PASSED[/]" if report.ok else
                  f"[bold red]{len(report.failed())} CHECK(S) FAILED[/]")
    if not report.ok:
        raise typer.Exit(1)


@app.command("trace")
def trace_cmd(
    subject: str = typer.Argument(..., help="package folder, <target>.tar.gz, a model.onnx, or a sha256"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable lineage on stdout"),
    repo: Path = typer.Option(None, "--repo", help="repository to search and cross-check [default: cwd if a git repo]"),
) -> None:
    """Which data, code and settings produced this model: from the package alone, cross-checked with the repo."""
    import json

    from lathe.audit.trace import print_trace, trace

    try:
        result = trace(subject, repo=repo)
    except LatheError as exc:
        fail(exc)
    if json_out:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        print_trace(result, Console())
    if result.get("cross_check", {}).get("status") == "MISMATCH":
        raise typer.Exit(2)


@app.command("serve")
def serve_cmd(
    repo: Path = typer.Option(None, "--repo", help="DVC repo the deployments run [default: cwd]"),
    api_url: str = typer.Option(None, "--api-url", help="use this Prefect server [default: $PREFECT_API_URL, "
                                "else start `prefect server start` on ops.serve.host:port]"),
    database_url: str = typer.Option(None, "--database-url", help="database of a server started here, e.g. "
                                     "postgresql+asyncpg://user:pass@host/prefect [default: "
                                     "$PREFECT_API_DATABASE_CONNECTION_URL, else SQLite under PREFECT_HOME]"),
    host: str = typer.Option(None, "--host", help="bind address of a server started here [default: ops.serve.host]"),
    port: int = typer.Option(None, "--port", help="port of a server started here [default: ops.serve.port]"),
) -> None:
    """Serve the scheduled pipeline (cron ops.schedule) and the data-change trigger on a Prefect server."""
    from flows.serve import ServeError, serve  # lazily: the core package never imports flows

    try:
        serve(repo, api_url, database_url, host, port, announce=console.print)
    except ServeError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopped")


if __name__ == "__main__":
    app()
