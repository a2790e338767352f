"""What a pipeline run publishes: the markdown of its Prefect artifacts, and what DVC says goes in them.

`lathe-metrics` (a finished run): the comparison table, every metrics file as a variant x metric
table, the pictures (the Pareto plot and the packaged variants' confusion matrices embedded), the
packages (ids, sha256s, gates), the data validation verdict and the stages. `lathe-failure` (a
failed run): the failed stage's message, the failed expectations of a data failure, the stages.
Every path in them is relative to the repository root (the artifacts are read on other machines).
This module only builds the text; flows.pipeline publishes it. Nothing here imports prefect.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from flows.failures import StageFailed
from lathe.audit.trace import PACKAGES_DIR
from lathe.markdown import markdown_table
from lathe.ship.contract import MANIFEST_FILE

METRICS_ARTIFACT_KEY = "lathe-metrics"
FAILURE_ARTIFACT_KEY = "lathe-failure"
COMPARISON_MD = "reports/compare.md"  # the compare stage's table, shown first in the metrics artifact
REPORTS_DIR = "reports"  # reports/<variant>/confusion.png: the packaged variants' pictures are embedded
PARETO_PNG = "reports/pareto.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")
# PNG bytes embedded (base64 data: URIs) in one metrics artifact; the rest are listed by path. The
# artifact lives in Prefect's database and travels to every UI client: keep it small.
EMBED_LIMIT_BYTES = 300_000
VALIDATION_SUMMARY = "data/validation/summary.md"
VALIDATION_RESULT = "data/validation/result.json"


# --- reading, straight from DVC (no Prefect) ------------------------------------------------------


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


def read_packages(root: Path) -> list[dict[str, Any]]:
    """One record per models/packages/<target>/manifest.json: id, archive sha256, gates, raw md5, build."""
    import json

    out: list[dict[str, Any]] = []
    for manifest_path in sorted((root / PACKAGES_DIR).glob(f"*/{MANIFEST_FILE}")):
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


# --- the markdown ---------------------------------------------------------------------------------


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
    rows = [[_cell(label), *(_cell(values[c]) if c in values else "–" for c in columns)]
            for label, values in zip(_row_labels(list(metrics)), metrics.values(), strict=True)]
    # every file empty: a one-column table of the variants
    return markdown_table(["variant", *(_cell(c) for c in columns)], rows)


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
    """One row per stage: its status and seconds, then the planned stages that did not run."""
    rows = [[_cell(r["stage"]), r["status"], f"{r['seconds']:.1f}"] for r in results]
    rows += [[_cell(name), "not run", "–"] for name in not_run]
    return markdown_table(["stage", "status", "seconds"], rows)


def failure_report(repo: Path, exc: StageFailed, results: Sequence[Mapping[str, Any]], plan: Sequence[str]) -> str:
    """The `lathe-failure` artifact of a failed stage: its message, the failed expectations of a data
    failure, and every planned stage's outcome."""
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


def packages_markdown(packages: Sequence[Mapping[str, Any]]) -> str:
    """One row per package: target, id, variant, archive sha256, gates and the flow run that built it."""
    if not packages:
        return f"_No packages under `{PACKAGES_DIR}`._\n"
    rows: list[list[str]] = []
    for p in packages:
        if "error" in p:
            rows.append([_cell(p["target"]), _cell(p["error"]), "–", "–", "–", "–"])
            continue
        gates = ", ".join(f"{g.get('gate')} {_cell(g.get('value'))} (limit {_cell(g.get('limit'))}) "
                          f"{'pass' if g.get('passed') else 'FAIL'}" for g in p["gates"]) or "–"
        rows.append([_cell(p["target"]), f"`{p['package_id']}`", _cell(p["variant"]),
                     f"`{p['archive_sha256'] or 'missing'}`", _cell(gates), _cell(p["build"].get("flow_run_id") or "–")])
    return markdown_table(["target", "package id", "variant", "archive sha256", "gates", "built by flow run"], rows)


def validation_markdown(root: Path) -> str:
    """One line: the validation verdict (expectations passed of evaluated) and where its report is."""
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
