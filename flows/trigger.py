"""Data-change trigger: run the pipeline only when the DVC-tracked inputs changed since the last package.

"Changed" means any of: no package manifest yet; the md5 in `data/raw.dvc` differs from the
`raw_data.md5` of the newest package (models/packages/*/manifest.json, by build time); or
`dvc status` reports something out of date. Otherwise the run is a cheap "no change" run: no stage
starts, and a `lathe-trigger` artifact records what was compared.

    python -m flows.trigger [--repo PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from flows.env import apply_offline_env

apply_offline_env(prefect_home=Path.cwd() / ".prefect" if __name__ == "__main__" else None)

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from flows.artifacts import read_packages  # noqa: E402
from flows.failures import LOCK_HELD  # noqa: E402
from flows.pipeline import run_pipeline  # noqa: E402

TRIGGER_ARTIFACT_KEY = "lathe-trigger"
RAW_DVC = "data/raw.dvc"


def raw_md5(root: Path, raw_dvc: str = RAW_DVC) -> str | None:
    """The md5 of the single out recorded in `raw_dvc` (None when the file is missing or has none)."""
    path = root / raw_dvc
    if not path.is_file():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    return outs[0].get("md5") if len(outs) == 1 else None


def last_package(root: Path) -> dict[str, Any] | None:
    """The newest readable package record (by manifest build time) that recorded a raw md5."""
    packages = [p for p in read_packages(root) if "error" not in p and p.get("raw_md5")]
    return max(packages, key=lambda p: str(p["build"].get("time") or ""), default=None)


def dvc_out_of_date(root: Path) -> list[str]:
    """What `dvc status` reports as changed (stage names and .dvc files); [] when all up to date."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as dvc_repo:
        return sorted(str(name) for name in dvc_repo.status())


def check_data(root: Path) -> dict[str, Any]:
    """{"changed": bool, "reasons": [...], "raw_md5", "package", "dvc_status"} for the repo at `root`."""
    current = raw_md5(root)
    package = last_package(root)
    reasons: list[str] = []
    if package is None:
        reasons.append("no package manifest with a raw_data.md5 yet")
    elif current != package["raw_md5"]:
        reasons.append(f"{RAW_DVC} md5 {current} differs from package {package['target']} "
                       f"({package['package_id']}) raw_data.md5 {package['raw_md5']}")
    try:
        status = dvc_out_of_date(root)
    except Exception as exc:  # a running pipeline holds DVC's lock: decide on the md5 alone
        if LOCK_HELD not in str(exc) and type(exc).__name__ != "LockError":
            raise
        status = None
    if status:
        reasons.append("dvc status: out of date: " + ", ".join(status))
    return {"changed": bool(reasons), "reasons": reasons, "raw_md5": current,
            "package": {k: package[k] for k in ("target", "package_id", "raw_md5", "manifest")} if package else None,
            "dvc_status": status}


def _report(root: Path, check: dict[str, Any]) -> str:
    pkg = check["package"]
    status = check["dvc_status"]
    lines = [
        f"# Lathe data-change check: {'CHANGED, running the pipeline' if check['changed'] else 'no change, nothing run'}\n",
        f"- repo: `{root}`",
        f"- `{RAW_DVC}` md5: `{check['raw_md5']}`",
        "- last package: " + (f"`{pkg['target']}` `{pkg['package_id']}` raw md5 `{pkg['raw_md5']}`" if pkg else "none"),
        f"- dvc status: {'unavailable (repo locked)' if status is None else ('up to date' if not status else ', '.join(status))}",
    ]
    lines += [f"- reason: {r}" for r in check["reasons"]]
    return "\n".join(lines) + "\n"


@flow(name="lathe-trigger", persist_result=False)
def run_if_data_changed(repo: Path | None = None, stages: list[str] | None = None) -> dict[str, Any]:
    """Run `run_pipeline(repo, stages)` only when the inputs changed; else record a "no change" run."""
    root = Path(repo if repo is not None else Path.cwd()).resolve()
    log = get_run_logger()
    check = check_data(root)
    create_markdown_artifact(key=TRIGGER_ARTIFACT_KEY, markdown=_report(root, check),
                             description="changed" if check["changed"] else "no change")
    run_id = flow_run.get_id()
    out = {"repo": str(root), "flow_run_id": str(run_id) if run_id else None, **check, "pipeline": None}
    if not check["changed"]:
        log.info("no change: %s md5 %s is what the last package was built from; dvc status clean",
                 RAW_DVC, check["raw_md5"])
        return out
    log.info("inputs changed (%s): running the pipeline", "; ".join(check["reasons"]))
    out["pipeline"] = run_pipeline(repo=root, stages=stages)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from dvc.exceptions import DvcException

    from flows.concurrency import PipelineBusy
    from flows.failures import StageFailed

    parser = argparse.ArgumentParser(prog="python -m flows.trigger", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        result = run_if_data_changed(repo=args.repo)
    except (StageFailed, PipelineBusy, DvcException) as exc:
        print(f"lathe trigger: {exc}", file=sys.stderr)
        return 1
    print("changed: ran the pipeline" if result["changed"] else "no change: nothing run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
