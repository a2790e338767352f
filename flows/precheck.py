"""`lathe check` before the first stage of a flow run: a bad config trains nothing and deletes nothing.

DVC removes a stage's outs before running it, so a params error found by the stage itself (prune's,
after the teacher trained for minutes) would already have cost `models/pruned`. The check takes about
a second and names every problem at once; the run then ends Failed with them in the `lathe-failure`
artifact and no stage started. A DVC project without Lathe's ingest stage (the flow tests' toy
pipelines) has nothing to check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class CheckFailed(RuntimeError):
    """The pre-run check found problems; `message` lists them, one per line."""

    def __init__(self, message: str, count: int) -> None:
        super().__init__(message, count)  # all state in args: the exception pickles cleanly
        self.message, self.count = message, count

    def __str__(self) -> str:
        return self.message


def check_before_run(root: Path, log: Any, artifact_key: str) -> None:
    """Run lathe.check.check_repo on `root`; on problems publish the artifact `artifact_key` and raise CheckFailed."""
    from prefect.artifacts import create_markdown_artifact

    from flows.ops import OpsParams
    from lathe.check import check_repo, ingest_raw_dir
    from lathe.errors import problem_list

    if ingest_raw_dir(root) is None:
        log.info("dvc.yaml has no Lathe ingest stage: no pre-run check")
        return
    report = check_repo(root, extra_sections={"ops": OpsParams})
    for warning in report.warnings:
        log.warning("lathe check: %s", warning)
    if report.ok:
        log.info("lathe check: %s", report.summary())
        return
    lines = [str(p) for p in report.problems]
    message = problem_list(f"lathe check found {len(lines)} problem(s); no stage was run:", lines)
    create_markdown_artifact(
        key=artifact_key,
        markdown=f"# Lathe pipeline run stopped before any stage\n\n`lathe check` in `{root}` found "
                 f"{len(lines)} problem(s):\n\n```text\n" + "\n".join(lines) + "\n```\n",
        description="Lathe pipeline stopped: params or raw data fail `lathe check`",
    )
    log.error("%s", message)
    raise CheckFailed(message, len(lines))
