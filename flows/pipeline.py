"""The Lathe pipeline as a Prefect flow: every dvc.yaml stage is a task running `dvc repro --single-item`.

Prefect orchestrates, DVC decides. DVC plans the order (the same plan `dvc repro` makes) and decides
per stage whether anything changed; this module only runs the plan, logs, stops at the first failure
and publishes a metrics table. Task and flow results are small JSON dicts, never persisted pickles.

    python -m flows.pipeline [--repo PATH] [--stage NAME ...] [--retries N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.env import apply_offline_env, subprocess_env

# Prefect reads its settings on import: offline defaults first. Started as a script, Prefect's
# state (PREFECT_HOME) also goes inside the project, as `make run` does.
apply_offline_env(prefect_home=Path.cwd() / ".prefect" if __name__ == "__main__" else None)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

METRICS_ARTIFACT_KEY = "lathe-metrics"
COMPARISON_JSON = "compare.json"  # the compare stage's metrics file; compare.md sits beside it
FAILURE_ARTIFACT_KEY = "lathe-failure"
PROJECT_FILE = "dvc.yaml"

# Substrings of DVC's own log lines (dvc/stage/__init__.py, run.py, cache.py), checked in this order.
_STATUS_MARKERS = (
    ("ran", "Running stage '"),
    ("restored", "is cached - skipping run"),
    ("verified", "Verifying data sources"),
    ("skipped", "didn't change, skipping"),
)
# stages/common.py: `[<stage>] FAILED: <message>` on stderr, then exit 1
_STAGE_FAILED = re.compile(r"^\[[^\]]+\] FAILED: ")


class StageFailed(RuntimeError):
    """A stage exited non-zero. `message` is the stage's own "[stage] FAILED: ..." line when it printed one."""

    def __init__(self, stage: str, message: str, returncode: int = 1, seconds: float = 0.0) -> None:
        # All state in args, so the exception pickles and copies cleanly.
        super().__init__(stage, message, returncode, seconds)
        self.stage, self.message, self.returncode, self.seconds = stage, message, returncode, seconds

    def __str__(self) -> str:
        return f"stage '{self.stage}' failed: {self.message}"

    def record(self) -> dict[str, Any]:
        return _record(self.stage, self.returncode, self.seconds, "failed") | {"message": self.message}


# --- planning and reading, straight from DVC (no Prefect) ---------------------------------------


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


def read_metrics(repo: Path) -> dict[str, dict[str, Any]]:
    """{metrics file path: flat {"a.b": value}} for every metrics file DVC knows, in the workspace."""
    from dvc.repo import Repo

    with contextlib.chdir(repo), Repo(".") as dvc_repo:
        shown = dvc_repo.metrics.show()  # {rev: {"data": {path: {"data": {...}} | {"error": ...}}}}
    workspace = next(iter(shown.values()), {})
    out: dict[str, dict[str, Any]] = {}
    for path, entry in workspace.get("data", {}).items():
        if "data" in entry:
            out[path] = _flatten(entry["data"])
        else:
            out[path] = {"error": str(entry.get("error", "unreadable"))}
    return out


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# --- one stage ------------------------------------------------------------------------------------


def _record(stage: str, returncode: int, seconds: float, status: str) -> dict[str, Any]:
    return {
        "stage": stage,
        "returncode": returncode,
        "seconds": round(seconds, 3),
        "status": status,  # ran | restored | verified | skipped | failed | unknown
        "ran": status == "ran",
    }


def _status(stdout: str, returncode: int) -> str:
    if returncode != 0:
        return "failed"
    return next((status for status, marker in _STATUS_MARKERS if marker in stdout), "unknown")


def _failure_message(stderr: str, returncode: int) -> str:
    """The stage's "[stage] FAILED: ..." line (plus continuation lines), else DVC's last ERROR line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    # at line start only: DVC's own ERROR line quotes the command, which may contain "FAILED:"
    failed = [i for i, line in enumerate(lines) if _STAGE_FAILED.match(line)]
    if failed:
        tail = lines[failed[-1] :]
        end = next((i for i, line in enumerate(tail) if line.startswith("ERROR: ")), len(tail))
        return "\n".join(tail[:end])
    errors = [line for line in lines if line.startswith("ERROR: ")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"dvc repro exited with {returncode}"


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
        message = _failure_message("".join(err), returncode)
        log.error("stage %s failed (exit %d): %s", stage, returncode, message)
        raise StageFailed(stage, message, returncode, seconds)
    result = _record(stage, returncode, seconds, _status("".join(out), returncode))
    log.info("stage %s: %s in %.1f s", stage, result["status"], seconds)
    return result


# --- reports --------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _row_labels(paths: Sequence[str]) -> list[str]:
    """reports/<variant>/metrics.json -> <variant> when those names are unique, else the path."""
    parents = [Path(p).parent.name for p in paths]
    if all(parents) and len(set(parents)) == len(parents):
        return parents
    return list(paths)


def metrics_markdown(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """A variant x metric table, one row per metrics file, columns in first-seen order."""
    if not metrics:
        return "_No metrics files declared in dvc.yaml._\n"
    columns: list[str] = []
    for values in metrics.values():
        columns += [key for key in values if key not in columns]
    lines = [
        "| variant | " + " | ".join(_cell(c) for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, values in zip(_row_labels(list(metrics)), metrics.values(), strict=True):
        cells = [_cell(values[c]) if c in values else "–" for c in columns]
        lines.append(f"| {_cell(label)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def metrics_report(root: Path, metrics: Mapping[str, Mapping[str, Any]], results: Sequence[Mapping[str, Any]]) -> str:
    """The run's markdown artifact: the comparison table when the pipeline wrote one, every
    per-variant metrics file, then the stages. The comparison's JSON (one nested document over all
    variants) is left out of the per-file table; its markdown twin is the readable form."""
    per_file = {path: values for path, values in metrics.items() if Path(path).name != COMPARISON_JSON}
    comparisons = [root / Path(p).with_suffix(".md") for p in metrics if Path(p).name == COMPARISON_JSON]
    parts = ["# Lathe metrics\n"] + [c.read_text() for c in comparisons if c.is_file()]
    parts += [f"## Every metrics file\n\n{metrics_markdown(per_file)}", f"## Stages\n\n{stages_markdown(results)}"]
    return "\n".join(parts)


def stages_markdown(results: Sequence[Mapping[str, Any]], not_run: Sequence[str] = ()) -> str:
    lines = ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {_cell(r['stage'])} | {r['status']} | {r['seconds']:.1f} |" for r in results]
    lines += [f"| {_cell(name)} | not run | – |" for name in not_run]
    return "\n".join(lines) + "\n"


def _failure_report(repo: Path, exc: StageFailed, results: Sequence[Mapping[str, Any]], plan: Sequence[str]) -> str:
    done = {r["stage"] for r in results}
    not_run = [name for name in plan if name not in done]
    return (
        f"# Lathe pipeline failed at stage `{exc.stage}`\n\n"
        f"Repo: `{repo}`, exit code {exc.returncode}.\n\n"
        f"```text\n{exc.message}\n```\n\n"
        f"## Stages\n\n{stages_markdown(results, not_run)}"
    )


# --- the flow -------------------------------------------------------------------------------------


@flow(name="lathe-pipeline", persist_result=False)
def run_pipeline(repo: Path | None = None, stages: list[str] | None = None, retries: int = 0) -> dict[str, Any]:
    """Run the DVC pipeline in `repo` (default: cwd), all stages or `stages` and their upstream.

    Each stage is one task; the first failure stops the run (downstream stages do not start),
    publishes a `lathe-failure` artifact and raises StageFailed. On success publishes the
    `lathe-metrics` artifact and returns {"repo", "flow_run_id", "stages": [...], "metrics": {...}}.
    `retries` is passed to every stage task (Prefect retries on StageFailed).
    """
    root = Path(repo if repo is not None else Path.cwd()).resolve()
    log = get_run_logger()
    plan = plan_stages(root, stages)
    log.info("plan (%d stages): %s", len(plan), " -> ".join(plan))
    stage_task = run_stage.with_options(retries=retries)

    results: list[dict[str, Any]] = []
    for name in plan:
        try:
            results.append(stage_task(name, str(root)))
        except StageFailed as exc:
            results.append(exc.record())
            create_markdown_artifact(
                key=FAILURE_ARTIFACT_KEY,
                markdown=_failure_report(root, exc, results, plan),
                description=f"Lathe pipeline failed at {exc.stage}",
            )
            raise

    metrics = read_metrics(root)
    create_markdown_artifact(
        key=METRICS_ARTIFACT_KEY,
        markdown=metrics_report(root, metrics, results),
        description="Metrics of every variant after the pipeline run",
    )
    ran = [r["stage"] for r in results if r["ran"]]
    log.info("pipeline done: %d ran (%s), %d up to date", len(ran), ", ".join(ran) or "none", len(results) - len(ran))
    run_id = flow_run.get_id()
    return {
        "repo": str(root),
        "flow_run_id": str(run_id) if run_id else None,
        "stages": results,
        "metrics": metrics,
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
    parser.add_argument("--retries", type=int, default=0, help="Prefect retries per stage task")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dvc.exceptions import DvcException

    args = _parser().parse_args(argv)
    try:
        run_pipeline(repo=args.repo, stages=args.stages, retries=args.retries)
    except (StageFailed, DvcException) as exc:  # anything else keeps its traceback
        print(f"lathe pipeline: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
