"""Compression-recipe sweeps as DVC experiments, run by a Prefect flow, summarised as a Pareto table.

Prefect orchestrates, DVC decides: every grid point is one `dvc exp run --temp -S key=value`
experiment, run one at a time (2 cores, and latencies are measured; with jobs > 1 the points are
queued, `dvc exp run --queue`, and `dvc exp run --run-all --jobs N` runs them);
`dvc exp show --json` is read back, and every (experiment, variant) row with its
accuracy, size and batch-1 latency goes into a Pareto table (lathe.measure.compare.pareto_front; lower size
or latency, higher quality is better):

    reports/experiments.md, reports/experiments.json     (plain files, not DVC outs)
    Prefect markdown artifact "lathe-experiments"

Results stay visible in `dvc exp show`. By default the experiments reproduce up to the `compare`
stage only: packaging signs with a key that lives outside git and refuses a dirty tree, and the
Pareto table needs only the evaluate metrics (pass targets=[] to run the whole pipeline; the flow
then points LATHE_SIGNING_KEY at the repo's key and sets LATHE_ALLOW_DIRTY=1, recorded in each
experiment's manifest).

    lathe exp [--repo PATH] [--set KEY=V1,V2 ...] [--target STAGE ...]   (or python -m flows.experiments ...)
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from flows.env import apply_offline_env, subprocess_env

apply_offline_env(prefect_home=Path.cwd() / ".prefect" if __name__ == "__main__" else None)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.artifacts import flatten  # noqa: E402
from lathe.markdown import markdown_table  # noqa: E402
from lathe.measure.compare import pareto_front  # noqa: E402
from lathe.ship.signing import DEFAULT_PRIVATE_KEY, ENV_SIGNING_KEY  # noqa: E402

ARTIFACT_KEY = "lathe-experiments"
REPORT_MD = Path("reports/experiments.md")
REPORT_JSON = Path("reports/experiments.json")
# Small on purpose: 2 x 2 x 2 = 8 experiments of the whole compression chain.
DEFAULT_GRID: dict[str, list[Any]] = {
    "prune.ratio": [0.3, 0.5],
    "distill.student.widths": [[16, 24, 48, 64], [12, 16, 32, 48]],
    "quantize.method": ["minmax", "percentile"],
}
DEFAULT_TARGETS = ["compare"]
SIZE_KEY, LATENCY_KEY = "size_bytes", "latency_p50_ms"
ROW_KEYS = ("accuracy", "balanced_accuracy", "defective_recall", "size_bytes", "latency_p50_ms", "params")


class SweepFailed(RuntimeError):
    """A dvc command of the sweep exited non-zero."""


# --- pure helpers (no DVC, no Prefect) -----------------------------------------------------------


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of `grid`, keys in the given order: [{key: value}, ...]."""
    if not grid:
        raise ValueError("empty grid: give at least one params key and its values")
    empty = [k for k, values in grid.items() if not values]
    if empty:
        raise ValueError(f"grid keys without values: {empty}")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def set_value(value: Any) -> str:
    """A value as `dvc exp run -S key=<value>` parses it (YAML): 0.5, minmax, [16, 24]."""
    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip().removesuffix("\n...").strip()


def experiment_name(prefix: str, index: int, point: Mapping[str, Any]) -> str:
    """A git-ref-safe, unique-per-sweep name: <prefix>-<index>-<6 hex of the params>."""
    digest = hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:6]
    return f"{prefix}-{index:02d}-{digest}"


def _revs(entries: Sequence[Mapping[str, Any]]):
    """(rev dict, executor state) for every experiment rev of `dvc exp show --json`."""
    for baseline in entries:
        for exp in baseline.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            for rev in exp.get("revs") or []:
                yield rev, state


def experiments_from_show(shown: Sequence[Mapping[str, Any]], names: Sequence[str],
                          grid_keys: Sequence[str]) -> list[dict[str, Any]]:
    """[{"name", "rev", "status", "settings": {grid key: value}, "variants": {variant: metrics}}] for the
    experiments called `names`, from `dvc exp show --json` (DVC 3 layout: baselines with "experiments":
    [{"executor": {"state"}, "revs": [{"rev", "name", "data": {"params": {file: {"data"}}, "metrics": ...}}]}])."""
    found: dict[str, dict[str, Any]] = {}
    for rev, state in _revs(shown):
        name = rev.get("name")
        if name not in names:
            continue
        data = rev.get("data") or {}
        params: dict[str, Any] = {}
        for content in (data.get("params") or {}).values():
            params.update(flatten(content.get("data") or {}))
        variants = {}
        for path, content in (data.get("metrics") or {}).items():
            parts = Path(path).parts
            if parts[:1] == ("reports",) and parts[-1] == "metrics.json" and len(parts) >= 3:
                variants["/".join(parts[1:-1])] = content.get("data") or {}
        found[name] = {"name": name, "rev": rev.get("rev"), "status": state,
                       "settings": {k: params.get(k) for k in grid_keys}, "variants": variants}
    return [found[n] for n in names if n in found]


def pareto_table(experiments: Sequence[Mapping[str, Any]], quality: str = "accuracy") -> dict[str, Any]:
    """One row per (experiment, variant) that has every ROW_KEY; Pareto flags for size and latency."""
    rows = []
    for exp in experiments:
        for variant, metrics in sorted(exp["variants"].items()):
            if all(isinstance(metrics.get(k), (int, float)) for k in ROW_KEYS):
                rows.append({"name": f"{exp['name']}:{variant}", "experiment": exp["name"], "variant": variant,
                             "settings": exp["settings"], **{k: metrics[k] for k in ROW_KEYS}})
    fronts = {SIZE_KEY: set(pareto_front(rows, SIZE_KEY, quality)), LATENCY_KEY: set(pareto_front(rows, LATENCY_KEY,
                                                                                                 quality))}
    for row in rows:
        row["pareto_size"] = row["name"] in fronts[SIZE_KEY]
        row["pareto_latency"] = row["name"] in fronts[LATENCY_KEY]
    rows.sort(key=lambda r: (not (r["pareto_size"] or r["pareto_latency"]), -r[quality], r[SIZE_KEY]))
    return {"quality": quality, "rows": rows,
            "experiments": [{k: e[k] for k in ("name", "rev", "status", "settings")} for e in experiments]}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def pareto_markdown(table: Mapping[str, Any]) -> str:
    quality = table["quality"]
    keys = list(dict.fromkeys(k for e in table["experiments"] for k in e["settings"]))
    lines = [f"# Lathe experiments: {quality} against size and latency\n",
             f"{len(table['experiments'])} experiments, {len(table['rows'])} evaluated models. "
             "Pareto: no other row is at least as good on both axes and better on one "
             f"(higher {quality}, lower size / batch-1 p50 latency). Latency is as the evaluate stage measured "
             "it in each experiment's run.\n",
             "## Experiments\n",
             markdown_table(["experiment", "status", *keys],
                            [[e["name"], e["status"], *(_fmt(e["settings"].get(k)) for k in keys)]
                             for e in table["experiments"]]),
             "## Models (Pareto-optimal first)\n"]
    models = []
    for r in table["rows"]:
        front = " + ".join(v for v, flag in (("size", r["pareto_size"]), ("latency", r["pareto_latency"])) if flag)
        models.append([r["experiment"], r["variant"], f"{r[quality]:.4f}", f"{r['balanced_accuracy']:.4f}",
                       f"{r['defective_recall']:.4f}", r["size_bytes"], f"{r['latency_p50_ms']:.4g}", front or "-"])
    lines.append(markdown_table(["experiment", "variant", quality, "balanced acc.", "defective recall", "size (B)",
                                 "p50 (ms)", "Pareto"], models))
    return "\n".join(lines)


# --- DVC ------------------------------------------------------------------------------------------


def _dvc_env(repo: Path, targets: Sequence[str]) -> dict[str, str]:
    extra = {"PYTHONUNBUFFERED": "1",
             "PATH": f"{Path(sys.executable).parent}:{subprocess_env().get('PATH', '')}"}
    if not targets:  # the package stage runs: it signs, and an experiment's tree is dirty by design
        key = repo / DEFAULT_PRIVATE_KEY
        if key.is_file():
            extra[ENV_SIGNING_KEY] = str(key)
        extra["LATHE_ALLOW_DIRTY"] = "1"
    return subprocess_env(extra)


def _dvc(repo: Path, args: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=dict(env), capture_output=True,
                         text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise SweepFailed(f"dvc {' '.join(args)} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return res


def set_args(params: Mapping[str, Any], point: Mapping[str, Any]) -> list[str]:
    """`-S` arguments for `point`. A key params.yaml already holds is overridden (`key=value`); a key
    it leaves to its default (a pydantic default, absent from the file) is added (`++key=value`).
    A key whose section is not in params.yaml is a typo: ValueError naming it."""
    args = []
    for key, value in point.items():
        node: Any = params
        parts = key.split(".")
        if not isinstance(params, Mapping) or parts[0] not in params:
            raise ValueError(f"grid key {key!r}: params.yaml has no section {parts[0]!r}")
        for part in parts:
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        args += ["-S", f"{'' if node is not _MISSING else '++'}{key}={set_value(value)}"]
    return args


_MISSING = object()


@task(name="dvc-exp-queue", persist_result=False, cache_policy=NO_CACHE)
def queue_experiment(repo: str, name: str, point: dict[str, Any], targets: list[str]) -> dict[str, Any]:
    sets = set_args(yaml.safe_load((Path(repo) / "params.yaml").read_text()) or {}, point)
    _dvc(Path(repo), ["exp", "run", "--queue", "--name", name, *sets, *targets], _dvc_env(Path(repo), targets))
    get_run_logger().info("queued %s: %s", name, point)
    return {"name": name, "params": point}


@task(name="dvc-exp-run", task_run_name="{name}", persist_result=False, cache_policy=NO_CACHE)
def run_experiment(repo: str, name: str, point: dict[str, Any], targets: list[str]) -> dict[str, Any]:
    """One experiment now, in a temporary copy of the repo (`dvc exp run --temp`): no queue, no celery
    worker. A failed experiment does not raise here (the sweep collects the others, then fails naming it)."""
    sets = set_args(yaml.safe_load((Path(repo) / "params.yaml").read_text()) or {}, point)
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", name, *sets, *targets],
                         cwd=repo, env=_dvc_env(Path(repo), targets), capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    seconds = round(time.monotonic() - start, 1)
    log = get_run_logger()
    log.info("%s %s: exit %d in %.1f s", name, point, res.returncode, seconds)
    if res.returncode != 0:
        log.error("dvc exp run --temp %s exited %d:\n%s", name, res.returncode, res.stderr[-3000:])
    return {"name": name, "params": point, "seconds": seconds, "returncode": res.returncode,
            "stderr_tail": res.stderr[-2000:]}


@task(name="dvc-exp-run-all", persist_result=False, cache_policy=NO_CACHE)
def run_queue(repo: str, targets: list[str], jobs: int = 1) -> dict[str, Any]:
    """`dvc exp run --run-all`; a failed experiment does not raise here: the sweep still collects
    what succeeded and then fails naming the experiments without results."""
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--run-all", "--jobs", str(jobs)], cwd=repo,
                         env=_dvc_env(Path(repo), targets), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = round(time.monotonic() - start, 1)
    log = get_run_logger()
    log.info("dvc exp run --run-all: exit %d in %.1f s\n%s", res.returncode, seconds, res.stdout[-3000:])
    if res.returncode != 0:
        log.error("dvc exp run --run-all exited %d:\n%s", res.returncode, res.stderr[-3000:])
    return {"seconds": seconds, "returncode": res.returncode, "stderr_tail": res.stderr[-2000:]}


@task(name="dvc-exp-show", persist_result=False, cache_policy=NO_CACHE)
def show_experiments(repo: str) -> list[dict[str, Any]]:
    res = _dvc(Path(repo), ["exp", "show", "--json"], subprocess_env())
    return json.loads(res.stdout)


def _write(path: Path, text: str) -> None:
    from lathe.io import write_text

    write_text(path, text)


@flow(name="lathe-experiments", persist_result=False)
def sweep(repo: Path | None = None, grid: dict[str, list] | None = None, targets: list[str] | None = None,
          quality: str = "accuracy", prefix: str | None = None, jobs: int = 1) -> dict[str, Any]:
    """Queue one `dvc exp run -S ...` per point of `grid` (default DEFAULT_GRID), run the queue with
    `jobs` workers, and write the Pareto table of every experiment's evaluated models.

    `targets`: stages each experiment reproduces (default ["compare"]; [] = the whole pipeline).
    Returns {"repo", "experiments": [...], "rows": [...], "report": path, "seconds": {...}}; raises
    SweepFailed when a dvc command fails or an experiment produced no metrics.
    """
    root = Path(repo if repo is not None else Path.cwd()).resolve()
    grid = dict(DEFAULT_GRID if grid is None else grid)
    targets = list(DEFAULT_TARGETS if targets is None else targets)
    prefix = prefix or time.strftime("sweep-%Y%m%d-%H%M%S", time.gmtime())
    log = get_run_logger()
    points = grid_points(grid)
    log.info("%d experiments over %s", len(points), list(grid))
    t0 = time.monotonic()
    if jobs == 1:
        # One after another, each in its own temp dir. DVC's queue (celery over a filesystem broker) is
        # not used here: under load its worker can die reading a half-written message, and
        # `dvc exp run --run-all` then waits forever for it (seen on a loaded 2-core machine).
        queued = [run_experiment(str(root), experiment_name(prefix, i, p), p, targets) for i, p in enumerate(points)]
        t_queue = 0.0
        failed = [q for q in queued if q["returncode"] != 0]
        ran = {"seconds": round(time.monotonic() - t0, 1), "returncode": failed[0]["returncode"] if failed else 0,
               "stderr_tail": failed[0]["stderr_tail"] if failed else ""}
    else:
        queued = [queue_experiment(str(root), experiment_name(prefix, i, p), p, targets) for i, p in enumerate(points)]
        t_queue = time.monotonic() - t0
        ran = run_queue(str(root), targets, jobs)
    shown = show_experiments(str(root))
    names = [q["name"] for q in queued]
    experiments = experiments_from_show(shown, names, list(grid))
    missing = sorted(set(names) - {e["name"] for e in experiments if e["variants"] and e["status"] in (None, "success")})
    table = pareto_table(experiments, quality)
    markdown = pareto_markdown(table)
    _write(root / REPORT_MD, markdown)
    _write(root / REPORT_JSON, json.dumps({"grid": grid, "targets": targets, **table}, indent=2, sort_keys=True) + "\n")
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=markdown,
                             description=f"Pareto table of {len(experiments)} DVC experiments ({prefix})")
    if missing:
        raise SweepFailed(f"experiments without results in `dvc exp show` (see the flow log, or `dvc queue logs NAME` "
                          f"with --jobs > 1): {missing}; dvc exp run exited {ran['returncode']}: "
                          f"{ran['stderr_tail'][-500:]}")
    return {"repo": str(root), "experiments": table["experiments"], "rows": table["rows"],
            "report": str(root / REPORT_MD),
            "seconds": {"queue": round(t_queue, 1), "run_all": ran["seconds"], "total": round(time.monotonic() - t0, 1)}}


# --- CLI ------------------------------------------------------------------------------------------


def parse_set(text: str) -> tuple[str, list[Any]]:
    """"quantize.method=minmax,percentile" -> ("quantize.method", ["minmax", "percentile"]); values are YAML,
    separated by ';' when a value itself holds commas ("distill.student.widths=[16,24];[12,16]")."""
    key, _, values = text.partition("=")
    if not key or not values:
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2 (or V1;V2), got {text!r}")
    parts = values.split(";") if ";" in values else values.split(",")
    return key, [yaml.safe_load(p) for p in parts]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=None)
    parser.add_argument("--set", dest="sets", type=parse_set, action="append", default=None,
                        help=f"a grid axis KEY=V1,V2 (repeatable; default: {json.dumps(DEFAULT_GRID)})")
    parser.add_argument("--target", dest="targets", action="append", default=None,
                        help="stage each experiment reproduces (repeatable; default compare; 'all' = whole pipeline)")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    grid = dict(args.sets) if args.sets else None
    targets = [] if args.targets == ["all"] else args.targets
    try:
        result = sweep(repo=args.repo, grid=grid, targets=targets, jobs=args.jobs)
    except SweepFailed as exc:
        print(f"lathe experiments: {exc}", file=sys.stderr)
        return 1
    print(Path(result["report"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
