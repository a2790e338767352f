"""Validate: the data gate. A Great Expectations suite over the prepared data and the raw files.

Everything checked is first put into a small pandas table (lathe.data.validate_tables), each
validated by a real GE 1.x ExpectationSuite (lathe.data.validate_gx); the outcomes and the
statistics make the ValidationReport (lathe.data.validate_report) the stage writes and gates on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from lathe.data.contract import TASK_FILE, Task, read_task
from lathe.data.ingest import SPLITS
from lathe.data.params import ValidateParams
from lathe.data.validate_gx import gx_context, import_gx, run_table
from lathe.data.validate_report import Outcome, ValidationReport, short
from lathe.data.validate_tables import (
    class_counts_table,
    groups_table,
    manifest_table,
    raw_files_table,
    read_manifest_frame,
    samples_table,
    splits_table,
    typed_manifest,
)
from lathe.errors import DataError
from lathe.io import sha256_file


def validate_prepared(
    prepared_dir: Path, raw_dir: Path, cfg: ValidateParams, image_size: int
) -> ValidationReport:
    """Run the data gate over `prepared_dir` (task, manifest, split arrays) and the raw files in `raw_dir`.
    `image_size` is params ingest.image_size: the task and the arrays must have it."""
    prepared_dir, raw_dir = Path(prepared_dir), Path(raw_dir)
    task = read_task(prepared_dir)
    if task.image_size != image_size:
        raise DataError(f"{prepared_dir / TASK_FILE}: image size {task.image_size}, but params ingest.image_size is "
                        f"{image_size}; rerun the ingest stage")
    manifest = typed_manifest(read_manifest_frame(prepared_dir))
    splits, loaded = splits_table(prepared_dir, task, len(manifest))
    tables = [
        manifest_table(manifest, cfg, task), class_counts_table(manifest, cfg, task), splits,
        samples_table(manifest, loaded), groups_table(manifest, task), raw_files_table(manifest, raw_dir),
    ]
    gx = import_gx()
    source = gx_context(gx).data_sources.add_pandas(name="lathe")
    outcomes = [o for t in tables if t is not None for o in run_table(gx, source, t)]
    stats = _statistics(manifest, task, prepared_dir, outcomes, gx.__version__)
    return ValidationReport(success=all(o.success for o in outcomes), statistics=stats, expectations=outcomes)


def _statistics(df: pd.DataFrame, task: Task, prepared_dir: Path,
                outcomes: list[Outcome], gx_version: str) -> dict[str, Any]:
    """Counts an auditor wants next to the verdict (and the package manifest will quote)."""
    def counts(col: str) -> dict[str, int]:
        if col not in df:
            return {}
        found = sorted(df[col].value_counts(dropna=False).items(), key=lambda kv: str(kv[0]))
        return {short(k): int(v) for k, v in found}

    per = {}
    if {"split", "label"} <= set(df.columns):
        for s in SPLITS:
            sub = df[df["split"] == s]["label"].value_counts()
            per[s] = {c: int(sub.get(c, 0)) for c in task.classes}
    n_ok = sum(o.success for o in outcomes)
    return {
        "rows": int(len(df)), "image_size": task.image_size, "channels": task.channels, "classes": list(task.classes),
        "splits": counts("split"), "labels": counts("label"),
        **{f"{c}_counts": counts(c) for c in task.stratify_metadata},
        "split_class_counts": per, "manifest_sha256": sha256_file(prepared_dir / "manifest.csv"),
        "evaluated_expectations": len(outcomes), "successful_expectations": n_ok,
        "unsuccessful_expectations": len(outcomes) - n_ok, "great_expectations_version": gx_version,
    }
