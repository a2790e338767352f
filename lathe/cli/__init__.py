"""The `lathe` command line: the only user-facing module inside the core package.

Every command ends in a result or in one line naming what is wrong (file, member or key); a
traceback only with `lathe --debug ...`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lathe.cli.common import (
    command_group,
    console,
    find_repo,
    one_line_errors,
    output_console,
    show_debug,
    state,
)
from lathe.cli.operations import RepoOption, ops_app
from lathe.errors import LatheError
from lathe.io import printable
from lathe.ship.signing import (
    DEFAULT_PRIVATE_KEY,
    DEFAULT_PUBLIC_KEY,
    ENV_KEYRING,
    ENV_PUBLIC_KEY,
    KEYRING_DIR,
)

app = command_group(help="Lathe: compress plant-floor models and keep the evidence auditors ask for.",
                    no_args_is_help=True)
data_app = command_group(help="Bring data into the raw layout (labels.csv with file,label + the images).",
                         no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(ops_app)  # run, exp, pool, status, serve: the operations front door, at the top level


def _print_version(value: bool) -> None:
    if value:
        from importlib import metadata

        import lathe

        libs = ", ".join(f"{name} {metadata.version(name)}" for name in ("torch", "onnxruntime", "dvc", "prefect"))
        typer.echo(f"lathe {lathe.__version__} ({libs})")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="show the traceback of an unexpected error"),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print the versions of lathe and its main libraries and exit"),
) -> None:
    """Lathe: compress plant-floor models and keep the evidence auditors ask for."""
    state["debug"] = debug


def refuse_non_empty(dest: Path) -> None:
    """Never mix a new import into existing raw data."""
    if dest.exists() and any(dest.iterdir()):
        raise LatheError(f"{dest} is not empty; import into an empty folder")


@data_app.command("import-elpv")
@one_line_errors
def import_elpv_cmd(dest: Path = typer.Argument(..., help="raw-layout folder to create, e.g. data/raw")) -> None:
    """Write the ELPV solar-cell dataset (from the installed elpv-dataset package) into DEST."""
    from lathe.data.raw import import_elpv

    refuse_non_empty(dest)
    with console.status("copying ELPV images"):
        n = import_elpv(dest)
    console.print(f"imported {n} ELPV samples into {dest}")


@data_app.command("import-folder")
@one_line_errors
def import_folder_cmd(
    src: Path = typer.Argument(..., help="one sub-folder per class (the ImageFolder layout): SRC/<class>/<images>"),
    dest: Path = typer.Argument(..., help="raw-layout folder to create, e.g. data/raw"),
    link: bool = typer.Option(False, "--link/--copy", help="symlink the images instead of copying them"),
) -> None:
    """Import a folder-per-class dataset into DEST: images under DEST/images/<class>/, labels.csv with
    file,label. Prints the `data:` lines params.yaml needs; then `dvc add DEST`."""
    from lathe.data.folder import import_folder

    refuse_non_empty(dest)
    with console.status(f"importing {src}"):
        counts = import_folder(src, dest, mode="link" if link else "copy")
    total = sum(counts.values())
    console.print(f"imported {total} images of {len(counts)} classes into {dest}: "
                  + ", ".join(f"{name} {n}" for name, n in counts.items()))
    console.print("params.yaml needs (name the defective classes):\n"
                  f"data:\n  classes: [{', '.join(counts)}]\n  defective: [...]", markup=False)


@data_app.command("generate")
@one_line_errors
def generate_cmd(
    dest: Path = typer.Argument(..., help="raw-layout folder to create"),
    per_class_type: int = typer.Option(6, min=1, help="images per class and cell type"),
    size: int = typer.Option(48, min=16, help="image side in px"),
    seed: int = typer.Option(0),
) -> None:
    """Write a small deterministic synthetic dataset in the raw layout (for tests and demos)."""
    from lathe.data.raw import generate_raw

    refuse_non_empty(dest)
    n = generate_raw(dest, per_class_type=per_class_type, size=size, seed=seed)
    console.print(f"generated {n} synthetic samples into {dest}")


@app.command("check")
@one_line_errors
def check_cmd(
    params: Path = typer.Option(None, "--params", help="params file [default: params.yaml of the repository "
                                "around the working directory]"),
    raw: Path = typer.Option(None, "--raw", help="raw-data folder [default: the one dvc.yaml's ingest stage reads]"),
) -> None:
    """Check params.yaml, every target and the raw data before a run (about a second; nothing is trained).
    Every problem is one line naming the key or file row; exit 1 when there is any."""
    from flows.ops import OpsParams  # lazily: the core package never imports flows at import time
    from lathe.audit.trust import git_toplevel
    from lathe.check import check_repo

    root = git_toplevel(Path.cwd()) or Path.cwd()
    report = check_repo(root, params and params.resolve(), raw and raw.resolve(), extra_sections={"ops": OpsParams})
    out = output_console()
    for problem in report.problems:
        out.print(str(problem), markup=False)
    for warning in report.warnings:
        out.print(f"warning: {warning}", markup=False)
    out.print(report.summary(), markup=False)
    if not report.ok:
        raise typer.Exit(1)


@app.command("gates")
@one_line_errors
def gates_cmd(
    profile: Path = typer.Option(None, "--profile", help="a file holding a `targets:` mapping, e.g. "
                                 "profiles/plant.yaml [default: params.yaml's targets]"),
    repo: RepoOption = None,
    out: Path = typer.Option(None, "--out", help="also write the report (markdown) to this file [default: "
                             "standard output only]"),
) -> None:
    """Judge every variant against each target's gates as the package stage does (threshold chosen on val,
    gates on test), without building or signing anything. Exit 0 when every target has a variant passing
    every gate, 1 when one has none (the report says how far the closest falls short)."""
    from lathe.check import PARAMS_FILE
    from lathe.config import load_params, parse_section
    from lathe.ship.params import PackageParams
    from lathe.ship.profile import gates_report, judge_targets, load_profile

    root = find_repo(repo)
    source = profile if profile is not None else root / PARAMS_FILE
    if not source.is_file():
        raise LatheError(f"{source}: no such profile file")
    targets = load_profile(source)
    variants = parse_section(load_params(root / PARAMS_FILE), "package", PackageParams).variants
    verdicts = judge_targets(targets, variants, root / "data" / "prepared", root / "models", root / "reports",
                             progress=lambda msg: console.print(msg, markup=False))
    text = gates_report(verdicts, printable(str(profile or PARAMS_FILE)))
    output_console().print(text, markup=False, highlight=False)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
    if any(v.chosen is None for v in verdicts):
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------
# keys: the signing pair, and the keyring verify and trace trust


keys_app = command_group(help="Signing keys (EC P-256, offline) and the keyring of trusted public keys.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
@one_line_errors
def keys_init_cmd(
    private: Path = typer.Option(DEFAULT_PRIVATE_KEY, "--private", help="private key (PEM, mode 0600)"),
    public: Path = typer.Option(DEFAULT_PUBLIC_KEY, "--public", help="public key (PEM) to give verifiers"),
    keyring: Path = typer.Option(KEYRING_DIR, "--keyring", help="keyring the public key is added to"),
    force: bool = typer.Option(False, "--force", help="replace existing keys (old packages stop verifying)"),
) -> None:
    """Create the signing key pair (once) and trust its public key in this repository's keyring."""
    from lathe.audit.trust import add_to_keyring
    from lathe.ship.signing import generate_keys

    if private.exists() and public.exists() and not force:
        console.print(f"keys already exist: {private} (private), {public} (public); nothing to create")
    else:
        generate_keys(private, public, force=force)
        console.print(f"wrote {private} (private, 0600; keep it out of git) and {public} (public)")
    key = add_to_keyring(public, keyring)
    console.print(f"trusted in {keyring}: {key.short} ({key.path.name})")


@keys_app.command("list")
@one_line_errors
def keys_list_cmd(
    keyring: Path = typer.Option(None, "--keyring", help=f"keyring folder [default: ${ENV_KEYRING}, else this "
                                 f"repository's {KEYRING_DIR}, else the user's]"),
    repo: Path = typer.Option(None, "--repo", help="repository whose keyring to list [default: the one around the cwd]"),
) -> None:
    """The trusted public keys verify and trace would use here, by fingerprint."""
    from lathe.audit.trust import resolve_trust

    trust = resolve_trust(keyring=keyring, repo=repo)
    out = output_console()
    out.print(f"source: {trust.source}")
    for key in trust.keys:
        out.print(f"sha256:{key.fingerprint}  {key.path}", markup=False, highlight=False)
    for problem in trust.problems:
        out.print(f"note: {printable(problem)}", markup=False, highlight=False)
    if not trust.keys:
        raise typer.Exit(1)


@keys_app.command("add")
@one_line_errors
def keys_add_cmd(
    public_key: Path = typer.Argument(..., help="a PEM public key file (EC P-256/384/521) to trust"),
    keyring: Path = typer.Option(KEYRING_DIR, "--keyring", help="keyring folder to add it to"),
) -> None:
    """Trust a public key: copy it into the keyring as <fingerprint>.pub."""
    from lathe.audit.trust import add_to_keyring

    key = add_to_keyring(public_key, keyring)
    console.print(f"trusted {key.short} in {keyring} ({key.path.name})")


@keys_app.command("remove")
@one_line_errors
def keys_remove_cmd(
    fingerprint: str = typer.Argument(..., help="fingerprint or its first 8+ hex digits (see `lathe keys list`)"),
    keyring: Path = typer.Option(KEYRING_DIR, "--keyring", help="keyring folder to remove it from"),
) -> None:
    """Stop trusting a key (rotation or revocation): packages it signed no longer verify here."""
    from lathe.audit.trust import remove_from_keyring

    for key in remove_from_keyring(fingerprint, keyring):
        console.print(f"removed sha256:{key.fingerprint} ({key.path})")


@keys_app.command("export")
@one_line_errors
def keys_export_cmd(
    public: Path = typer.Option(DEFAULT_PUBLIC_KEY, "--public", help="the public key to export"),
    out: Path = typer.Option(None, "--out", help="write the key here [default: standard output]"),
) -> None:
    """The signing public key in canonical PEM, with its fingerprint, to hand to a plant's verifiers."""
    from lathe.ship.signing import fingerprint, public_key_pem, write_key_file

    pem = public_key_pem(public)
    if out is None:
        typer.echo(pem.decode("ascii"), nl=False)
    else:
        write_key_file(out, pem, 0o644)
    console.print(f"fingerprint sha256:{fingerprint(pem)}")


# ---------------------------------------------------------------------------------------------
# verify and trace


def missing_path_message(path: Path, what: str, repo: Path | None) -> str:
    """"<path>: <what>; did you mean <near match>?" (the suggestion when a sibling name is close)."""
    from lathe.audit.trace import did_you_mean
    from lathe.audit.trust import git_toplevel

    near = did_you_mean(path, repo or git_toplevel(Path.cwd()) or Path.cwd())
    return f"{printable(str(path))}: {what}" + (f"; did you mean {printable(near)}?" if near else "")


PUBLIC_KEY_HELP = f"trust only this public key [default: ${ENV_PUBLIC_KEY}, else a keyring]"
KEYRING_HELP = (f"trust the *.pub keys in this folder [default: ${ENV_KEYRING}, else <repo>/{KEYRING_DIR}, "
                "else ~/.config/lathe/trusted-keys]")
# The trust anchors verify and trace take, declared once (typer reads the Annotated metadata).
PublicKeyOption = Annotated[Path | None, typer.Option("--public-key", help=PUBLIC_KEY_HELP)]
KeyringOption = Annotated[Path | None, typer.Option("--keyring", help=KEYRING_HELP)]


@app.command("verify")
@one_line_errors
def verify_cmd(
    package: Path = typer.Argument(..., help="package folder or <target>.tar.gz"),
    public_key: PublicKeyOption = None,
    keyring: KeyringOption = None,
    target: str = typer.Option(None, "--target", help="the target this package must be for [default: any]"),
    package_id: str = typer.Option(None, "--package-id", help="the exact package id your deployment record names "
                                   "(refuses an older genuine package: the rollback defence) [default: any]"),
    rebuild: bool = typer.Option(False, "--rebuild", help="after every other check passed: rebuild at the recorded "
                                 "commit and compare every byte"),
    full: bool = typer.Option(False, "--full", help="with --rebuild: rerun every stage from raw data, not only package"),
    repo: Path = typer.Option(None, "--repo", help="git + DVC repository for --rebuild and its keyring [default: cwd]"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable report on stdout"),
) -> None:
    """Check the package offline (hashes, stamp, binding, signature by a trusted key), then run its self-test
    confined; exit 0 only if every check passes."""
    from lathe.audit.render import render_verify
    from lathe.audit.trust import resolve_trust
    from lathe.audit.verify import verify_package

    if not package.exists():
        raise LatheError(missing_path_message(package, "no such package folder or archive", repo))
    trust = resolve_trust(package, public_key, keyring, repo)
    with console.status("verifying"):
        report = verify_package(package, trust, target=target, package_id=package_id, rebuild=rebuild, repo=repo,
                                full=full)
    show_debug(report.debug)
    if json_out:
        typer.echo(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        render_verify(report, output_console())
    if not report.ok:
        raise typer.Exit(1)


@app.command("trace")
@one_line_errors
def trace_cmd(
    subject: str = typer.Argument(..., help="package folder, <target>.tar.gz, a model.onnx, or a sha256"),
    public_key: PublicKeyOption = None,
    keyring: KeyringOption = None,
    repo: Path = typer.Option(None, "--repo", help="repository to search and cross-check [default: cwd if a git repo]"),
    params: bool = typer.Option(False, "--params", help="also list every params section"),
    json_out: bool = typer.Option(False, "--json", help="everything, machine-readable, on stdout"),
) -> None:
    """Which data, code and settings produced this model, verified first. Exit 0 VERIFIED, 2 MISMATCH,
    3 UNVERIFIED (no trusted key), 4 UNKNOWN (the repository cannot vouch for the lineage), 1 error."""
    from lathe.audit.render import render_trace
    from lathe.audit.trace import exit_status, trace
    from lathe.audit.trust import resolve_trust

    trust = resolve_trust(Path(subject) if Path(subject).exists() else None, public_key, keyring, repo)
    result = trace(subject, trust, repo=repo)
    if json_out:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        render_trace(result, output_console(), params=params)
    code = exit_status(result)
    if code:
        raise typer.Exit(code)


if __name__ == "__main__":
    app()
