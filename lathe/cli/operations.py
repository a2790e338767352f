"""The operations front door: `lathe run`, `exp`, `pool deploy`, `serve`, `status`.

Each command finds the repository (`--repo`, else the git work tree around the working directory,
so any sub-folder works), sets the offline environment with Prefect's state in <repo>/.prefect, and
only then imports the flow: Prefect reads its settings on import. The flows stay importable and
runnable on their own (`python -m flows.pipeline` and friends); these commands call the same functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from lathe.cli.common import command_group, console, find_repo, one_line_errors, output_console
from lathe.errors import DATA_ERROR_EXIT, LatheError

ops_app = command_group()
pool_app = command_group(help="Scale-out: register the flows in a Prefect work pool that workers poll.",
                       no_args_is_help=True)
ops_app.add_typer(pool_app, name="pool")

REPO_HELP = "the Lathe repository [default: the git work tree around the working directory]"
DEPLOYMENTS_REPO_HELP = "the repository the deployments run [default: the git work tree around the working directory]"
# The --repo option, declared once for every command (typer reads the Annotated metadata).
RepoOption = Annotated[Path | None, typer.Option("--repo", help=REPO_HELP)]
DeploymentsRepoOption = Annotated[Path | None, typer.Option("--repo", help=DEPLOYMENTS_REPO_HELP)]


def _enter(repo: Path | None) -> Path:
    """The repository root, with the offline environment set before any Prefect import."""
    from flows.env import apply_offline_env

    root = find_repo(repo)
    apply_offline_env(prefect_home=root / ".prefect")
    return root


@ops_app.command("run")
@one_line_errors
def run_cmd(
    repo: RepoOption = None,
    stage: list[str] = typer.Option([], "--stage", metavar="STAGE", help="run this stage and the stages upstream "
                                    "of it (repeatable) [default: every stage]"),
    retries: int = typer.Option(None, "--retries", min=0, help="retries of a stage after a transient failure "
                                "[default: params.yaml ops.retries]"),
    verbose: bool = typer.Option(False, "--verbose", help="stage logs keep the libraries' warnings (torch, onnx, "
                                 "onnxruntime), which they otherwise drop (sets LATHE_VERBOSE=1)"),
) -> None:
    """Run the pipeline as a Prefect flow: every stage DVC finds stale, in DVC's order (as `python -m flows.pipeline`).

    Exit 0 when it completed, 3 when the data gate (or a stage's data check) failed, 1 on any other failure."""
    root = _enter(repo)
    if verbose:
        # stages.common.VERBOSE_ENV, which the stages inherit (not imported: stages/ pins numerics on import)
        os.environ["LATHE_VERBOSE"] = "1"
    from dvc.exceptions import DvcException

    from flows.concurrency import PipelineBusy
    from flows.failures import StageFailed
    from flows.pipeline import run_pipeline

    try:
        result = run_pipeline(repo=root, stages=stage or None, retries=retries)
    except StageFailed as exc:
        console.print(f"error: pipeline {exc} ({exc.kind} failure; the Prefect artifact 'lathe-failure' has the "
                      "report)", markup=False)
        raise typer.Exit(DATA_ERROR_EXIT if exc.kind == "data" else 1) from None
    except (PipelineBusy, DvcException) as exc:
        raise LatheError(f"pipeline: {exc}") from exc
    ran = [r["stage"] for r in result["stages"] if r["ran"]]
    out = output_console()
    out.print(f"pipeline done in {root}: {len(ran)} stage(s) ran ({', '.join(ran) or 'none'}), "
              f"{len(result['stages']) - len(ran)} up to date; flow run {result['flow_run_id']}", markup=False)
    for p in result["packages"]:
        out.print(f"package {p['target']}: {p.get('package_id') or p.get('error')}", markup=False)


@ops_app.command("exp")
@one_line_errors
def exp_cmd(
    repo: RepoOption = None,
    axes: list[str] = typer.Option([], "--set", metavar="KEY=V1,V2", help="one grid axis, values as YAML, ';' "
                                   "between values that hold commas (repeatable) [default: flows.experiments."
                                   "DEFAULT_GRID]"),
    targets: list[str] = typer.Option([], "--target", metavar="STAGE", help="stage each experiment reproduces "
                                      "(repeatable; 'all' = the whole pipeline, signed packages included) "
                                      "[default: compare]"),
    jobs: int = typer.Option(1, "--jobs", min=1, help="experiments run at once (latencies are measured: keep 1 "
                             "on a small machine)"),
) -> None:
    """Sweep compression recipes as DVC experiments and write the Pareto table reports/experiments.{md,json}
    (as `python -m flows.experiments`)."""
    import argparse

    root = _enter(repo)
    from flows.experiments import SweepFailed, parse_set, sweep

    try:
        grid = dict(parse_set(a) for a in axes) if axes else None
    except argparse.ArgumentTypeError as exc:
        raise LatheError(f"--set: {exc}") from exc
    try:
        result = sweep(repo=root, grid=grid, targets=[] if targets == ["all"] else (targets or None), jobs=jobs)
    except (SweepFailed, ValueError) as exc:
        raise LatheError(f"experiments: {exc}") from exc
    typer.echo(Path(result["report"]).read_text(), nl=False)


@pool_app.command("deploy")
@one_line_errors
def pool_deploy_cmd(
    repo: DeploymentsRepoOption = None,
    pool: str = typer.Option(None, "--pool", help="work pool, created when missing [default: params.yaml "
                             "ops.work_pool.name]"),
    api_url: str = typer.Option(None, "--api-url", help="the shared Prefect server [default: $PREFECT_API_URL]"),
) -> None:
    """Register the scheduled pipeline and the data-change trigger in a work pool on a shared Prefect server
    (as `python -m flows.workpool deploy`); then start `prefect worker start --pool NAME` beside each checkout."""
    root = _enter(repo)
    from flows.workpool import DeployError, deploy_to_server, deployed_lines

    try:
        name, ids = deploy_to_server(root, pool, api_url)
    except DeployError as exc:
        raise LatheError(f"pool deploy: {exc}") from exc
    for line in deployed_lines(name, ids):
        output_console().print(line, markup=False)


@ops_app.command("serve")
@one_line_errors
def serve_cmd(
    repo: DeploymentsRepoOption = None,
    api_url: str = typer.Option(None, "--api-url", help="use this Prefect server [default: $PREFECT_API_URL, "
                                "else start `prefect server start` on ops.serve.host:port]"),
    database_url: str = typer.Option(None, "--database-url", help="database of a server started here, e.g. "
                                     "postgresql+asyncpg://user:pass@host/prefect [default: "
                                     "$PREFECT_API_DATABASE_CONNECTION_URL, else SQLite under PREFECT_HOME]"),
    host: str = typer.Option(None, "--host", help="bind address of a server started here [default: params.yaml "
                             "ops.serve.host, 127.0.0.1]"),
    port: int = typer.Option(None, "--port", min=1, max=65535, help="port of a server started here and of its UI "
                             "[default: params.yaml ops.serve.port, 4200]"),
) -> None:
    """Serve the scheduled pipeline (cron ops.schedule) and the data-change trigger on a Prefect server until
    Ctrl-C, which stops a server started here too."""
    from flows.serve import ServeError, serve  # lazily: imports nothing of Prefect before the environment is set

    root = find_repo(repo)
    try:
        serve(root, api_url, database_url, host, port, announce=console.print)  # returns on Ctrl-C
    except ServeError as exc:
        raise LatheError(f"serve: {exc}") from exc
    except KeyboardInterrupt:  # before serving began
        pass
    console.print("Lathe: stopped")


@ops_app.command("status")
@one_line_errors
def status_cmd(
    repo: RepoOption = None,
    api_url: str = typer.Option(None, "--api-url", help="Prefect server to ask for the last run [default: "
                                "$PREFECT_API_URL, else `lathe serve`'s ops.serve.host:port if it answers, else the "
                                "runs recorded on disk]"),
    json_out: bool = typer.Option(False, "--json/--no-json", help="machine-readable, on standard output"),
) -> None:
    """What is stale (`dvc status`), the last pipeline run, and the packages present (id, target, variant, size)."""
    from lathe.cli.status import collect, render

    root = _enter(repo)
    report = collect(root, api_url or os.environ.get("PREFECT_API_URL"))
    if json_out:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        render(report, output_console())
