"""`lathe status`: what is stale, the last pipeline run, the packages present. Read-only, a few seconds.

The last run comes from the Prefect API when a server answers (the one named, else the one `lathe serve`
starts on ops.serve.host:port); else from Prefect's own database on disk (PREFECT_HOME/prefect.db, where
`lathe run` without a server records its runs), read-only; else from the flow run ids the packages record.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lathe.errors import LatheError
from lathe.io import printable

MAX_MANIFEST_BYTES = 10 * 2**20
# Prefect's SQLite schema (tables flow, flow_run): the newest started run of the pipeline flow
_LAST_RUN_SQL = """
SELECT flow_run.id, flow_run.name, flow_run.state_name, flow_run.start_time, flow_run.end_time
FROM flow_run JOIN flow ON flow.id = flow_run.flow_id
WHERE flow.name = ? AND flow_run.start_time IS NOT NULL
ORDER BY flow_run.start_time DESC LIMIT 1
"""


def collect(root: Path, api_url: str | None) -> dict[str, Any]:
    """{"repo", "stale": {stage: [what changed]}, "last_run": {...} | None, "packages": [...]}."""
    return {"repo": str(root), "stale": stale_stages(root), "last_run": last_run(root, api_url),
            "packages": packages(root)}


# --- dvc status -----------------------------------------------------------------------------------


def stale_stages(root: Path) -> dict[str, list[str]]:
    """`dvc status --json` as {stage or .dvc file: ["changed deps: params.yaml (modified)", ...]}; {} = up to date."""
    from flows.env import subprocess_env

    res = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, env=subprocess_env(),
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise LatheError(f"dvc status failed in {root}: {printable(last, 300)}")
    try:
        status = json.loads(res.stdout or "{}")
    except ValueError as exc:
        raise LatheError(f"dvc status --json in {root}: unreadable output ({exc})") from exc
    return {stage: [_change(c) for c in changes] for stage, changes in status.items()}


def _change(change: Any) -> str:
    """"always changed" stays; {"changed deps": {"a": "modified", "params.yaml": {"k": "modified"}}} becomes
    "changed deps: a (modified), params.yaml (k)"."""
    if not isinstance(change, Mapping):
        return str(change)
    parts = []
    for kind, paths in change.items():
        if isinstance(paths, Mapping):
            items = ", ".join(f"{p} ({s if isinstance(s, str) else ', '.join(map(str, s))})" for p, s in paths.items())
        else:
            items = str(paths)
        parts.append(f"{kind}: {items}")
    return "; ".join(parts)


# --- the last run ---------------------------------------------------------------------------------


def last_run(root: Path, api_url: str | None) -> dict[str, Any] | None:
    """The newest started run of the pipeline flow: from the API, else Prefect's database, else the packages."""
    from flows.pipeline import load_ops  # the offline environment is set (operations._enter)
    from flows.serve import api_healthy

    if not api_url:
        ops = load_ops(root)
        serve_url = f"http://{ops.serve.host}:{ops.serve.port}/api"
        api_url = serve_url if api_healthy(serve_url, timeout=1) else None
    elif not api_healthy(api_url, timeout=5):
        raise LatheError(f"no Prefect server answers on {api_url} (--api-url / PREFECT_API_URL)")
    if api_url:
        return _last_run_from_api(api_url)
    return _last_run_from_db(Path(os.environ.get("PREFECT_HOME") or root / ".prefect") / "prefect.db") or \
        _last_run_from_packages(root)


def _flow_name() -> str:
    from flows.pipeline import run_pipeline

    return run_pipeline.name


def _last_run_from_api(api_url: str) -> dict[str, Any] | None:
    os.environ["PREFECT_API_URL"] = api_url  # before Prefect reads its settings
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterStartTime
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[_flow_name()])),
                                     flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
    if not runs:
        return {"source": f"Prefect API {api_url}", "id": None}
    run = runs[0]
    return {"source": f"Prefect API {api_url}", "id": str(run.id), "name": run.name,
            "state": run.state.name if run.state else None,
            "start": run.start_time.isoformat() if run.start_time else None,
            "end": run.end_time.isoformat() if run.end_time else None}


def _last_run_from_db(db: Path) -> dict[str, Any] | None:
    if not db.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute(_LAST_RUN_SQL, (_flow_name(),)).fetchone()
    except sqlite3.Error as exc:
        return {"source": f"Prefect database {db}", "id": None, "note": f"unreadable: {exc}"}
    if row is None:
        return {"source": f"Prefect database {db}", "id": None}
    run_id, name, state, start, end = row
    return {"source": f"Prefect database {db}", "id": _uuid(run_id), "name": name, "state": state,
            "start": str(start) if start else None, "end": str(end) if end else None}


def _uuid(value: Any) -> str:
    import uuid

    return str(uuid.UUID(bytes=value)) if isinstance(value, bytes) and len(value) == 16 else str(value)


def _last_run_from_packages(root: Path) -> dict[str, Any] | None:
    built = sorted((p for p in packages(root) if p.get("flow_run_id")), key=lambda p: p.get("built") or "")
    if not built:
        return None
    p = built[-1]
    return {"source": f"package manifest {p['manifest']} (build.flow_run_id: the run that built it)",
            "id": p["flow_run_id"], "name": None, "state": "Completed", "start": None, "end": None}


# --- packages -------------------------------------------------------------------------------------


def packages(root: Path) -> list[dict[str, Any]]:
    """One record per models/packages/<target>/manifest.json: target, id, variant, model and archive bytes."""
    from lathe.audit.trace import PACKAGES_DIR
    from lathe.audit.verify import ARCHIVE_SUFFIX
    from lathe.ship.contract import MANIFEST_FILE, MODEL_FILE

    out = []
    for manifest_path in sorted((root / PACKAGES_DIR).glob(f"*/{MANIFEST_FILE}")):
        folder = manifest_path.parent
        archive = folder.with_name(folder.name + ARCHIVE_SUFFIX)
        record: dict[str, Any] = {"target": folder.name, "manifest": str(manifest_path.relative_to(root)),
                                  "model_bytes": _size(folder / MODEL_FILE), "archive_bytes": _size(archive)}
        try:
            if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
                raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
            manifest = json.loads(manifest_path.read_bytes())
            target, build = manifest.get("target"), manifest.get("build") or {}
            record.update({"target": target.get("name", folder.name) if isinstance(target, Mapping) else folder.name,
                           "package_id": manifest.get("package_id"), "variant": manifest.get("variant"),
                           "built": build.get("time"),  # the commit's time (rebuilds match), not the run's
                           "flow_run_id": build.get("flow_run_id")})
        except (OSError, ValueError, AttributeError) as exc:
            record["error"] = f"unreadable manifest: {exc}"
        out.append(record)
    return out


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


# --- the view -------------------------------------------------------------------------------------


def render(report: Mapping[str, Any], console: Console) -> None:
    """Three short sections: stale stages, the last run, the packages."""
    stale = report["stale"]
    console.print(Text("repository ", style="bold") + Text(report["repo"]))
    if not stale:
        console.print(Text("stale: nothing, the pipeline is up to date (dvc status)", style="green"))
    else:
        console.print(Text(f"stale: {len(stale)} (dvc status; `lathe run` reproduces them)", style="bold yellow"))
        for stage, changes in stale.items():
            console.print(Text(f"  {stage}: ", style="bold") + Text(printable("; ".join(changes), 2000)))
    run = report["last_run"]
    if run is None or run.get("id") is None:
        where = f" ({run['source']}{', ' + run['note'] if run.get('note') else ''})" if run else ""
        console.print(Text(f"last run: none recorded{where}"))
    else:
        when = ", ".join(f"{k} {run[k]}" for k in ("start", "end") if run.get(k))
        console.print(Text("last run: ", style="bold") + Text(
            f"{run.get('state') or '?'} {run.get('name') or ''} (id {run['id']}{', ' + when if when else ''}) "
            f"from {run['source']}"))
    rows = report["packages"]
    if not rows:
        console.print(Text("packages: none under models/packages"))
        return
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in ("target", "package id", "variant", "model bytes", "archive bytes", "commit time"):
        table.add_column(column, no_wrap=True)
    for p in rows:
        if "error" in p:
            table.add_row(p["target"], Text(p["error"], style="red"), "", "", "", "")
            continue
        table.add_row(*(printable(str(v), 200) if v is not None else "-" for v in (
            p["target"], p["package_id"], p["variant"], p["model_bytes"], p["archive_bytes"], p.get("built"))))
    console.print(Text("packages:", style="bold"))
    console.print(table)
