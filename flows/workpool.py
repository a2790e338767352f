"""Scale-out: the same Lathe flows as deployments of a Prefect work pool, run by workers.

`lathe serve` runs the flows inside the serving process's machine. A plant with many lines instead
registers them once on a shared Prefect server, in a work pool, and starts a worker beside each
checkout (or lets a Docker/Kubernetes pool start one container per run; see README "Scale-out"):

    lathe pool deploy [--repo PATH] [--pool NAME] [--api-url URL]   (or python -m flows.workpool deploy ...)
    prefect worker start --pool NAME            # on each machine that runs the pipeline

`deploy` creates the pool (type `ops.work_pool.type`, default "process") if it does not exist and
registers two deployments in it: `lathe-pipeline/<pool>-scheduled` on cron `ops.schedule` and
`lathe-trigger/<pool>-data-change` every `ops.trigger_interval_minutes`, both with
parameters {"repo": <repo>}. The flow code is taken from this checkout (a local source): a process
worker runs it from here, with the worker's Python and environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from flows.env import apply_offline_env

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the flows' code, as the worker loads it
PIPELINE_ENTRYPOINT = "flows/pipeline.py:run_pipeline"
TRIGGER_ENTRYPOINT = "flows/trigger.py:run_if_data_changed"


def deployment_names(pool: str) -> dict[str, str]:
    """{"pipeline": "lathe-pipeline/<pool>-scheduled", "trigger": "lathe-trigger/<pool>-data-change"}."""
    return {"pipeline": f"lathe-pipeline/{pool}-scheduled", "trigger": f"lathe-trigger/{pool}-data-change"}


def ensure_work_pool(name: str, pool_type: str) -> Any:
    """The work pool `name`, created with type `pool_type` when missing; an existing pool of another
    type is an error (its workers would not run these deployments as configured)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            return client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
    if pool.type != pool_type:
        raise ValueError(f"work pool '{name}' exists with type '{pool.type}', not '{pool_type}' "
                         "(params ops.work_pool.type); choose another pool name")
    return pool


def deploy(repo: Path, pool: str | None = None) -> tuple[str, dict[str, UUID]]:
    """Register the scheduled pipeline and the data-change trigger for `repo` in the work pool
    (`pool`, default ops.work_pool.name). Needs PREFECT_API_URL to point at the server.

    Returns (pool name, {"pipeline": deployment id, "trigger": deployment id}).
    """
    from prefect import flow as prefect_flow
    from prefect.schedules import Cron, Interval

    from flows.pipeline import load_ops

    root = Path(repo).resolve()
    ops = load_ops(root)
    name = pool or ops.work_pool.name
    ensure_work_pool(name, ops.work_pool.type)
    params = {"repo": str(root)}
    schedules = {
        "pipeline": Cron(ops.schedule, timezone=ops.timezone),
        "trigger": Interval(timedelta(minutes=ops.trigger_interval_minutes)),
    }
    entrypoints = {"pipeline": PIPELINE_ENTRYPOINT, "trigger": TRIGGER_ENTRYPOINT}
    ids = {}
    for key, full_name in deployment_names(name).items():
        source = prefect_flow.from_source(source=str(PROJECT_ROOT), entrypoint=entrypoints[key])
        ids[key] = source.deploy(
            name=full_name.split("/", 1)[1], work_pool_name=name, parameters=params, schedule=schedules[key],
            tags=["lathe", name], description=f"Lathe {key} on {root} through work pool '{name}'",
            print_next_steps=False,
        )
    return name, ids


class DeployError(RuntimeError):
    """No server to deploy to, or a pool that cannot take these deployments."""


def deploy_to_server(repo: Path, pool: str | None = None, api_url: str | None = None) -> tuple[str, dict[str, UUID]]:
    """`deploy` on the server `api_url` (default $PREFECT_API_URL), after checking it answers.

    Raises DeployError (one line) when no server is named or none answers, or the pool has another type."""
    apply_offline_env()
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    if not os.environ.get("PREFECT_API_URL"):
        raise DeployError("set PREFECT_API_URL (or --api-url) to the shared Prefect server")
    from flows.serve import api_healthy

    if not api_healthy(os.environ["PREFECT_API_URL"], timeout=10):
        raise DeployError(f"no Prefect server answers on {os.environ['PREFECT_API_URL']}")
    try:
        return deploy(repo, pool)
    except ValueError as exc:
        raise DeployError(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.workpool deploy ...`; the same as `lathe pool deploy`."""
    parser = argparse.ArgumentParser(prog="python -m flows.workpool", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dep = sub.add_parser("deploy", help="create the work pool if needed and register the deployments in it")
    dep.add_argument("--repo", type=Path, default=Path.cwd(), help="DVC repo the deployments run (default: cwd)")
    dep.add_argument("--pool", default=None, help="work pool name (default: params ops.work_pool.name)")
    dep.add_argument("--api-url", default=None, help="Prefect server (default: $PREFECT_API_URL)")
    args = parser.parse_args(argv)
    try:
        pool, ids = deploy_to_server(args.repo, args.pool, args.api_url)
    except DeployError as exc:
        print(f"lathe deploy: {exc}", file=sys.stderr)
        return 1
    for line in deployed_lines(pool, ids):
        print(line)
    return 0


def deployed_lines(pool: str, ids: dict[str, UUID]) -> list[str]:
    """What to tell the user after a deploy: the two deployments and the worker command."""
    return [*(f"registered {name} ({ids[key]}) in work pool '{pool}'" for key, name in deployment_names(pool).items()),
            f"now start a worker where the repo lives: prefect worker start --pool {pool}"]


if __name__ == "__main__":
    sys.exit(main())
