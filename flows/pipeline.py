"""The Lathe pipeline as a Prefect flow: every dvc.yaml stage is a task running `dvc repro --single-item`.

Prefect orchestrates, DVC decides. DVC plans the order (the same plan `dvc repro` makes) and decides
per stage whether anything changed; this module only runs the plan, logs, stops at the first failure
and publishes a metrics table. Task and flow results are small JSON dicts, never persisted pickles.

Failures are classified (`classify_failure`): a data failure (the `validate` stage, or a stage exiting
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
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from flows.env import apply_offline_env, subprocess_env
from flows.precheck import CheckFailed, check_before_run
from flows.recovery import LockfileBroken, recover_workspace
from lathe.errors import DATA_ERROR_EXIT  # a stage's exit status for bad input data

# Prefect reads its settings on import: offline defaults first. Started as a script, Prefect's
# state (PREFECT_HOME) also goes inside the project, as `make run` does.
apply_offline_env(prefect_home=Path.cwd() / ".prefect" if __name__ == "__main__" else None)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

METRICS_ARTIFACT_KEY = "lathe-metrics"
COMPARISON_MD = "reports/compare.md"  # the compare stage's table, shown first in the metrics artifact
REPORTS_DIR = "reports"  # reports/<variant>/confusion.png: the packaged variants' pictures are embedded
PARETO_PNG = "reports/pareto.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")
# PNG bytes embedded (base64 data: URIs) in one metrics artifact; the rest are listed by path. The
# artifact lives in Prefect's database and travels to every UI client: keep it small.
EMBED_LIMIT_BYTES = 300_000
FAILURE_ARTIFACT_KEY = "lathe-failure"
PROJECT_FILE = "dvc.yaml"
PARAMS_FILE = "params.yaml"
VALIDATION_STAGES = frozenset({"validate"})  # a non-zero exit of these is a data failure
VALIDATION_SUMMARY = "data/validation/summary.md"
VALIDATION_RESULT = "data/validation/result.json"
PACKAGES_DIR = "models/packages"
LOCK_HELD = "Unable to acquire lock"  # dvc/lock.py: another DVC process holds the repo lock
OUT_BUSY = "is busy, it is being blocked by"  # dvc/rwlock.py: another DVC process reads/writes that path
# dvc/stage/exceptions.py: "failed to run: <cmd>, exited with <status>" (negative: killed by a signal)
_CMD_EXIT = re.compile(r"exited with (-?\d+)")
FAILURE_KINDS = ("data", "transient", "error")
# A POSIX shell (DVC runs commands through $SHELL, else /bin/sh) reports a child killed by signal N
# as 128+N; without the shell in between, Python sees -N. SIGKILL (the OOM killer, a preempted
# node) and SIGTERM (a stopped container) are transient; SIGINT (a user's Ctrl-C) is not.
_TRANSIENT_SIGNALS = (signal.SIGKILL, signal.SIGTERM)

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
    """A stage exited non-zero. `message` is the stage's own "[stage] FAILED: ..." line when it printed one.

    `kind` is one of FAILURE_KINDS: "data" (bad input data; never retried), "transient" (killed
    process or held lock; retried as ops params say) or "error" (anything else; not retried).
    """

    def __init__(self, stage: str, message: str, returncode: int = 1, seconds: float = 0.0,
                 kind: str = "error") -> None:
        # All state in args, so the exception pickles and copies cleanly.
        super().__init__(stage, message, returncode, seconds, kind)
        self.stage, self.message, self.returncode, self.seconds = stage, message, returncode, seconds
        self.kind = kind

    def __str__(self) -> str:
        return f"stage '{self.stage}' failed: {self.message}"

    def record(self) -> dict[str, Any]:
        return _record(self.stage, self.returncode, self.seconds, "failed") | {"message": self.message,
                                                                               "kind": self.kind}


class PipelineBusy(RuntimeError):
    """Another Lathe run held the pipeline's concurrency slot for longer than the timeout."""

    def __init__(self, limit: str, timeout: float | None) -> None:
        super().__init__(limit, timeout)
        self.limit, self.timeout = limit, timeout

    def __str__(self) -> str:
        return (f"refused: another Lathe pipeline run holds the '{self.limit}' concurrency slot and did not "
                f"finish within {self.timeout or 0:g} s (params ops.concurrency_timeout_seconds); nothing was run")


# --- failure classes and ops params ---------------------------------------------------------------


def stage_exit_code(stderr: str) -> int | None:
    """The stage command's own exit status from DVC's "failed to run: ..., exited with N" line."""
    codes = _CMD_EXIT.findall(stderr)
    return int(codes[-1]) if codes else None


def killed_by_signal(code: int | None) -> bool:
    """Whether a command's exit status means it was killed: -N from Python, 128+N from a shell."""
    if code is None:
        return False
    return code < 0 or code in {128 + int(sig) for sig in _TRANSIENT_SIGNALS}


def classify_failure(stage: str, returncode: int, stderr: str) -> str:
    """"data", "transient" or "error" for a failed `dvc repro --single-item <stage>`.

    data: the validation stage failed, or the command exited DATA_ERROR_EXIT.
    transient: `dvc` itself or the stage command was killed by a signal (negative status, or
    128+SIGKILL/SIGTERM when a shell sat in between), or the
    DVC repo lock (or a path's read/write lock) was held by another process.
    """
    cmd_code = stage_exit_code(stderr)
    if returncode < 0 or killed_by_signal(cmd_code) or LOCK_HELD in stderr or OUT_BUSY in stderr:
        return "transient"
    if stage.split("@", 1)[0] in VALIDATION_STAGES or cmd_code == DATA_ERROR_EXIT:
        return "data"
    return "error"


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn: retry only StageFailed of kind "transient"."""
    exc = getattr(state, "data", None)
    return isinstance(exc, StageFailed) and exc.kind == "transient"


def load_ops(root: Path) -> Any:
    """The `ops:` section of root/params.yaml (OpsParams defaults when the file or section is absent)."""
    from flows.ops import OpsParams
    from lathe.config import load_params, parse_section

    path = root / PARAMS_FILE
    params = load_params(path) if path.is_file() else {}
    return parse_section(params, "ops", OpsParams, str(path)) if "ops" in params else OpsParams()


def ensure_concurrency_limit(name: str) -> None:
    """Create the one-slot global concurrency limit `name` on the Prefect server (or reset it to 1).

    Prefect's upsert reads, then creates: two runs starting together can both find no limit, and
    the later create fails with ObjectAlreadyExists. The other run created it, so upsert again
    (it now reads the limit and only resets it to 1 if needed).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, 1)
        except ObjectAlreadyExists:
            client.upsert_global_concurrency_limit_by_name(name, 1)


@contextlib.contextmanager
def pipeline_slot(name: str, timeout: float | None) -> Iterator[None]:
    """Hold the one slot of `name` for the block; PipelineBusy after `timeout` seconds of waiting."""
    from prefect.concurrency.sync import concurrency

    ensure_concurrency_limit(name)
    with contextlib.ExitStack() as stack:
        try:  # AcquireConcurrencySlotTimeoutError is a TimeoutError; only the wait is guarded
            stack.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout, strict=True))
        except TimeoutError as exc:
            raise PipelineBusy(name, timeout) from exc
        yield


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
            out[path] = flatten(entry["data"])
        else:
            out[path] = {"error": str(entry.get("error", "unreadable"))}
    return out


def read_pictures(repo: Path) -> list[str]:
    """Repo-relative paths of the images dvc.yaml declares as plots (what `dvc plots show` renders), sorted."""
    from dvc.repo import Repo

    root = Path(repo).resolve()
    with contextlib.chdir(root), Repo(".") as dvc_repo:
        paths = {Path(os.path.relpath(out.fs_path, root)).as_posix() for out in dvc_repo.index.outs if out.plot}
    return sorted(p for p in paths if p.lower().endswith(IMAGE_SUFFIXES))


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b": value}, as DVC shows metrics and params."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
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
        message = _failure_message(stderr, returncode)
        kind = classify_failure(stage, returncode, stderr)
        log.error("stage %s failed (exit %d, %s failure): %s", stage, returncode, kind, message)
        raise StageFailed(stage, message, returncode, seconds, kind)
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
    """reports/<variant>/metrics.json -> <variant> (e.g. quantized/student) when unique, else the path."""
    parents = [PurePosixPath(p).parent for p in paths]
    if len(paths) > 1 and len({PurePosixPath(p).name for p in paths}) == 1:
        common = PurePosixPath(os.path.commonpath([str(p) for p in parents]))
        labels = [p.relative_to(common).as_posix() for p in parents]
    else:
        labels = [p.name for p in parents]
    if all(label not in ("", ".") for label in labels) and len(set(labels)) == len(labels):
        return labels
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


def metrics_report(root: Path, metrics: Mapping[str, Mapping[str, Any]], results: Sequence[Mapping[str, Any]],
                   pictures: Sequence[str] = ()) -> str:
    """The run's markdown artifact: the comparison table when the pipeline wrote one, the headline
    figures of every metrics file, the pictures, packages, validation and stages. Every path in it is
    relative to the repository root (the artifact is read on other machines)."""
    comparison = root / COMPARISON_MD
    packages = read_packages(root)
    parts = ["# Lathe metrics\n"] + ([comparison.read_text()] if comparison.is_file() else [])
    parts += [f"## Every metrics file\n\n{metrics_markdown(metrics)}",
              f"## Pictures\n\n{pictures_markdown(root, pictures, [p.get('variant') for p in packages])}",
              f"## Packages\n\n{packages_markdown(packages)}",
              f"## Data validation\n\n{validation_markdown(root)}",
              f"## Stages\n\n{stages_markdown(results)}"]
    return "\n".join(parts)


def pictures_markdown(root: Path, pictures: Sequence[str], packaged: Sequence[Any] = ()) -> str:
    """The Pareto plot and the packaged variants' confusion matrices embedded as data: URIs (within
    EMBED_LIMIT_BYTES), then every picture by its repo-relative path."""
    import base64

    if not pictures:
        return "_No pictures declared as plots in dvc.yaml._\n"
    wanted = [PARETO_PNG] + [f"{REPORTS_DIR}/{v}/confusion.png" for v in packaged if isinstance(v, str)]
    budget, shown = EMBED_LIMIT_BYTES, []
    for rel in [p for p in dict.fromkeys(wanted) if p in pictures and p.endswith(".png")]:
        path = root / rel
        size = path.stat().st_size if path.is_file() else budget + 1
        if size <= budget:
            budget -= size
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            shown.append(f"`{rel}`\n\n![{rel}](data:image/png;base64,{data})\n")
    listed = [f"- `{p}`{'' if (root / p).is_file() else ' (missing)'}" for p in pictures]
    note = (f"All {len(pictures)} pictures, repository-relative; `dvc plots show` renders them offline into "
            "`dvc_plots/index.html` (git-ignored):\n")
    return "\n".join([*shown, note, *listed]) + "\n"


def stages_markdown(results: Sequence[Mapping[str, Any]], not_run: Sequence[str] = ()) -> str:
    lines = ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {_cell(r['stage'])} | {r['status']} | {r['seconds']:.1f} |" for r in results]
    lines += [f"| {_cell(name)} | not run | – |" for name in not_run]
    return "\n".join(lines) + "\n"


def _failure_report(repo: Path, exc: StageFailed, results: Sequence[Mapping[str, Any]], plan: Sequence[str]) -> str:
    done = {r["stage"] for r in results}
    not_run = [name for name in plan if name not in done]
    kind = exc.kind
    what = {"data": "data failure, not retried", "transient": "transient failure, retries exhausted",
            "error": "error, not retried"}[kind]
    parts = [
        f"# Lathe pipeline failed at stage `{exc.stage}`\n\n"
        f"Repo: `{repo}`, exit code {exc.returncode} ({what}).\n\n"
        f"```text\n{exc.message}\n```\n"
    ]
    summary = repo / VALIDATION_SUMMARY
    if kind == "data" and summary.is_file():
        parts.append(f"## Failed expectations (`{VALIDATION_SUMMARY}`)\n\n{summary.read_text()}\n")
    parts.append(f"## Stages\n\n{stages_markdown(results, not_run)}")
    return "\n".join(parts)


def read_packages(root: Path) -> list[dict[str, Any]]:
    """One record per models/packages/<target>/manifest.json: id, archive sha256, gates, raw md5, build."""
    import json

    out: list[dict[str, Any]] = []
    for manifest_path in sorted((root / PACKAGES_DIR).glob("*/manifest.json")):
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            out.append({"target": manifest_path.parent.name, "error": f"unreadable manifest: {exc}"})
            continue
        sha_file = manifest_path.parent.with_name(manifest_path.parent.name + ".tar.gz.sha256")
        sha = sha_file.read_text().split()[0] if sha_file.is_file() and sha_file.read_text().split() else None
        target = manifest.get("target")
        out.append({
            "target": target.get("name") if isinstance(target, Mapping) else manifest_path.parent.name,
            "package_id": manifest.get("package_id"),
            "variant": manifest.get("variant"),
            "archive_sha256": sha,
            "manifest": str(manifest_path.relative_to(root)),
            "raw_md5": (manifest.get("raw_data") or {}).get("md5"),
            "gates": manifest.get("gates") or [],
            "build": manifest.get("build") or {},
        })
    return out


def packages_markdown(packages: Sequence[Mapping[str, Any]]) -> str:
    if not packages:
        return f"_No packages under `{PACKAGES_DIR}`._\n"
    lines = ["| target | package id | variant | archive sha256 | gates | built by flow run |", "|---|---|---|---|---|---|"]
    for p in packages:
        if "error" in p:
            lines.append(f"| {_cell(p['target'])} | {_cell(p['error'])} | – | – | – | – |")
            continue
        gates = ", ".join(f"{g.get('gate')} {_cell(g.get('value'))} (limit {_cell(g.get('limit'))}) "
                          f"{'pass' if g.get('passed') else 'FAIL'}" for g in p["gates"]) or "–"
        lines.append(f"| {_cell(p['target'])} | `{p['package_id']}` | {_cell(p['variant'])} | "
                     f"`{p['archive_sha256'] or 'missing'}` | {_cell(gates)} | {_cell(p['build'].get('flow_run_id') or '–')} |")
    return "\n".join(lines) + "\n"


def validation_markdown(root: Path) -> str:
    import json

    result, summary = root / VALIDATION_RESULT, root / VALIDATION_SUMMARY
    if not result.is_file():
        return "_No validation report (no `validate` stage output)._\n"
    try:
        data = json.loads(result.read_text())
        stats = data.get("statistics") or {}
        verdict = (f"{'passed' if data.get('success') else 'FAILED'}: {stats.get('successful_expectations', '?')}/"
                   f"{stats.get('evaluated_expectations', '?')} expectations")
    except (OSError, ValueError, AttributeError) as exc:
        verdict = f"unreadable: {exc}"
    where = f"`{VALIDATION_SUMMARY}`" if summary.is_file() else "(no summary.md)"
    return f"Validation {verdict}. Report: {where} and `{VALIDATION_RESULT}`.\n"


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
                    markdown=_failure_report(root, exc, results, plan),
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
