"""The Lathe pipeline as a Prefect flow: every dvc.yaml stage is a task running `dvc repro --single-item`.

Prefect orchestrates, DVC decides. DVC plans the order (the same plan `dvc repro` makes) and decides
per stage whether anything changed; this module only runs the plan, logs, stops at the first failure
and publishes a metrics table. Task and flow results are small JSON dicts, never persisted pickles.
The failure classes are in flows.failures, the run's slot in flows.concurrency, the artifacts' text
in flows.artifacts.

Failures are classified (`flows.failures.classify_failure`): a data failure (the `validate` stage, or a stage exiting
with DATA_ERROR_EXIT) is never retried and ends the run Failed with the failed expectations in the
`lathe-failure` artifact; a transient failure (a killed process, DVC's repo lock held) is retried
`ops.retries` times, `ops.retry_delay_seconds` apart; anything else fails at once. A whole run holds
the Prefect global concurrency limit `ops.concurrency_limit` (one slot), so two runs never interleave;
DVC's own repo lock is the second line. Before planning and before each stage,
`flows.recovery.recover_workspace` repairs what a killed run left: it keeps a copy of a valid dvc.lock
and puts it back over a truncated one, and removes dead stages' scratch temp folders.

    lathe run [--repo PATH] [--stage NAME ...] [--retries N]   (or python -m flows.pipeline ...)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flows.artifacts import (
    FAILURE_ARTIFACT_KEY,
    METRICS_ARTIFACT_KEY,
    failure_report,
    metrics_report,
    read_metrics,
    read_packages,
    read_pictures,
)
from flows.concurrency import PipelineBusy, pipeline_slot
from flows.env import apply_offline_env, subprocess_env
from flows.failures import StageFailed, classify_failure, failure_message, retry_transient, stage_record
from flows.precheck import CheckFailed, check_before_run
from flows.recovery import LockfileBroken, recover_workspace
from lathe.check import PARAMS_FILE, PROJECT_FILE

# Prefect reads its settings on import: offline defaults first. Started as a script, Prefect's
# state (PREFECT_HOME) also goes inside the project, as `make run` does.
apply_offline_env(prefect_home=Path.cwd() / ".prefect" if __name__ == "__main__" else None)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

# Substrings of DVC's own log lines (dvc/stage/__init__.py, run.py, cache.py), checked in this order.
_STATUS_MARKERS = (
    ("ran", "Running stage '"),
    ("restored", "is cached - skipping run"),
    ("verified", "Verifying data sources"),
    ("skipped", "didn't change, skipping"),
)


# --- ops params and the plan, straight from DVC (no Prefect) --------------------------------------


def load_ops(root: Path) -> Any:
    """The `ops:` section of root/params.yaml (OpsParams defaults when the file or section is absent)."""
    from flows.ops import OpsParams
    from lathe.config import load_params, parse_section

    path = root / PARAMS_FILE
    params = load_params(path) if path.is_file() else {}
    return parse_section(params, "ops", OpsParams, str(path)) if "ops" in params else OpsParams()


def plan_stages(repo: Path, targets: Sequence[str] | None = None) -> list[str]:
    """Stage addresses in the order `dvc repro [targets]` would visit them (upstream first).

    Includes `foreach` items (`evaluate@teacher`) and `.dvc` data sources that feed the pipeline
    (`data/raw.dvc`), exactly as DVC plans them; targets pull in their upstream stages.
    """
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    # DVC resolves targets against the working directory, not the repo root.
    with contextlib.chdir(repo), Repo(".") as dvc_repo:
        stages = collect_stages(dvc_repo, list(targets) if targets else [PROJECT_FILE])
        return [stage.addressing for stage in plan_repro(get_active_graph(dvc_repo.index.graph), stages)]


# --- one stage ------------------------------------------------------------------------------------


def _status(stdout: str, returncode: int) -> str:
    if returncode != 0:
        return "failed"
    return next((status for status, marker in _STATUS_MARKERS if marker in stdout), "unknown")


def _pump(stream: Iterable[str], sink: list[str], log: Any, prefix: str) -> None:
    for line in stream:
        sink.append(line)
        if line.strip():
            log.info("%s%s", prefix, line.rstrip())


def _stage_env() -> dict[str, str]:
    # `python` in dvc.yaml commands resolves to this interpreter's environment; output arrives live.
    extra = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONUNBUFFERED": "1",
    }
    run_id = flow_run.get_id()
    if run_id:
        extra["LATHE_FLOW_RUN_ID"] = str(run_id)  # for lineage records; stages may ignore it
    return subprocess_env(extra)


@task(
    name="dvc-stage",
    task_run_name="{stage}",
    persist_result=False,
    cache_policy=NO_CACHE,  # DVC decides what is up to date
)
def run_stage(stage: str, repo: str) -> dict[str, Any]:
    """`dvc repro --single-item <stage>` in `repo`; raises StageFailed on a non-zero exit."""
    log = get_run_logger()
    try:
        repaired = recover_workspace(Path(repo))
    except LockfileBroken as exc:
        raise StageFailed(stage, str(exc), 1, kind="error") from exc
    for message in repaired:
        log.warning("%s", message)
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    log.info("$ dvc %s", " ".join(cmd[3:]))
    out: list[str] = []
    err: list[str] = []
    start = time.monotonic()
    with subprocess.Popen(
        cmd,
        cwd=repo,
        env=_stage_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        bufsize=1,
    ) as proc:
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, out, log, ""), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, err, log, "stderr: "), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        returncode = proc.wait()
    seconds = time.monotonic() - start

    if returncode != 0:
        stderr = "".join(err)
        message = failure_message(stderr, returncode)
        kind = classify_failure(stage, returncode, stderr)
        log.error("stage %s failed (exit %d, %s failure): %s", stage, returncode, kind, message)
        raise StageFailed(stage, message, returncode, seconds, kind)
    result = stage_record(stage, returncode, seconds, _status("".join(out), returncode))
    log.info("stage %s: %s in %.1f s", stage, result["status"], seconds)
    return result


# --- the flow -------------------------------------------------------------------------------------


def _recover_before_planning(root: Path, log: Any) -> None:
    """Planning reads dvc.lock too: repair the repo (or fail with a lathe-failure artifact) first."""
    try:
        repaired = recover_workspace(root)
    except LockfileBroken as exc:
        create_markdown_artifact(key=FAILURE_ARTIFACT_KEY, markdown=f"# Lathe pipeline run stopped\n\n{exc}\n",
                                 description="Lathe pipeline stopped: dvc.lock is broken")
        raise
    for message in repaired:
        log.warning("%s", message)


@flow(name="lathe-pipeline", persist_result=False)
def run_pipeline(repo: Path | None = None, stages: list[str] | None = None, retries: int | None = None,
                 retry_delay_seconds: float | None = None) -> dict[str, Any]:
    """Run the DVC pipeline in `repo` (default: cwd), all stages or `stages` and their upstream.

    Each stage is one task; the first failure stops the run (downstream stages do not start),
    publishes a `lathe-failure` artifact and raises StageFailed. On success publishes the
    `lathe-metrics` artifact and returns {"repo", "flow_run_id", "stages": [...], "metrics": {...}}.
    Transient stage failures are retried `retries` times `retry_delay_seconds` apart (default: the
    repo's params.yaml `ops:` section); data and other failures never are. The whole run holds the
    `ops.concurrency_limit` slot: a concurrent run waits, and after `ops.concurrency_timeout_seconds`
    fails with PipelineBusy.
    """
    root = Path(repo if repo is not None else Path.cwd()).resolve()
    log = get_run_logger()
    check_before_run(root, log, FAILURE_ARTIFACT_KEY)  # params and raw data, before anything waits or runs
    ops = load_ops(root)
    stage_task = run_stage.with_options(
        retries=ops.retries if retries is None else retries,
        retry_delay_seconds=ops.retry_delay_seconds if retry_delay_seconds is None else retry_delay_seconds,
        retry_condition_fn=retry_transient,
    )
    log.info("waiting for the '%s' concurrency slot", ops.concurrency_limit)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(pipeline_slot(ops.concurrency_limit, ops.concurrency_timeout_seconds))
        except PipelineBusy as exc:
            create_markdown_artifact(key=FAILURE_ARTIFACT_KEY, markdown=f"# Lathe pipeline run refused\n\n{exc}\n",
                                     description="Lathe pipeline run refused: another run holds the slot")
            raise
        log.info("holding the '%s' concurrency slot", ops.concurrency_limit)
        _recover_before_planning(root, log)
        plan = plan_stages(root, stages)
        log.info("plan (%d stages): %s", len(plan), " -> ".join(plan))

        results: list[dict[str, Any]] = []
        for name in plan:
            try:
                results.append(stage_task(name, str(root)))
            except StageFailed as exc:
                results.append(exc.record())
                create_markdown_artifact(
                    key=FAILURE_ARTIFACT_KEY,
                    markdown=failure_report(root, exc, results, plan),
                    description=f"Lathe pipeline failed at {exc.stage} ({exc.kind})",
                )
                raise

        metrics = read_metrics(root)
        create_markdown_artifact(
            key=METRICS_ARTIFACT_KEY,
            markdown=metrics_report(root, metrics, results, read_pictures(root)),
            description="Metrics of every variant, pictures, packages (ids, sha256s, gates) and the validation report",
        )
    ran = [r["stage"] for r in results if r["ran"]]
    log.info("pipeline done: %d ran (%s), %d up to date", len(ran), ", ".join(ran) or "none", len(results) - len(ran))
    run_id = flow_run.get_id()
    return {
        "repo": str(root),
        "flow_run_id": str(run_id) if run_id else None,
        "stages": results,
        "metrics": metrics,
        "packages": read_packages(root),
    }


# --- CLI ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=None, help="DVC repo root (default: current directory)")
    parser.add_argument(
        "--stage",
        dest="stages",
        action="append",
        default=None,
        help="target stage, repeatable; upstream stages are included (default: all)",
    )
    parser.add_argument("--retries", type=int, default=None,
                        help="retries of a stage after a transient failure (default: params.yaml ops.retries)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dvc.exceptions import DvcException

    args = _parser().parse_args(argv)
    try:
        run_pipeline(repo=args.repo, stages=args.stages, retries=args.retries)
    except (StageFailed, PipelineBusy, CheckFailed, DvcException) as exc:  # anything else keeps its traceback
        print(f"lathe pipeline: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
