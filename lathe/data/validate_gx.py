"""Running the data gate's tables through Great Expectations 1.x and naming the offending rows.

Each Table is validated by a real GE ExpectationSuite built from its Checks, so every check
reports the same way: a name, success, an observed value, and the offending rows mapped back to
their `where`. Great Expectations is imported lazily: it takes ~5 s, and only this stage needs it.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
import pandas as pd

from lathe.data.validate_report import MAX_OFFENDERS, Offender, Outcome, short
from lathe.data.validate_tables import Check, Table
from lathe.offline import OFFLINE_ENV


def import_gx() -> Any:
    """Import great_expectations quietly (no analytics), only when a validation runs."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # GE logs hundreds of setup lines at INFO while importing (some modules pin their own logger
    # to INFO), and stages log at INFO: mute INFO during the import, then raise GE's loggers.
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        import great_expectations as gx
        import great_expectations.expectations  # noqa: F401  (registers expectations: more logs)
    finally:
        logging.disable(previous)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("great_expectations")]:
        logging.getLogger(name).setLevel(logging.WARNING)
    return gx


def gx_context(gx: Any) -> Any:
    """An in-memory GE context with progress bars off (they would clutter the stage's stderr)."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return ctx


def run_table(gx: Any, source: Any, table: Table) -> list[Outcome]:
    """Validate one table with a GE suite built from its checks; outcomes in check order."""
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=f"lathe.{table.name}")
    for check in table.checks:
        cls = getattr(gxe, check.gx_class)
        suite.add_expectation(cls(**check.kwargs, meta={"name": check.name}))
    asset = source.add_dataframe_asset(name=table.name)
    batch = asset.add_batch_definition_whole_dataframe(f"{table.name}_whole").get_batch(
        batch_parameters={"dataframe": table.frame}
    )
    # COMPLETE: every offending row's index comes back, so offenders map to files exactly.
    result = batch.validate(suite, result_format="COMPLETE")
    by_name = {r.expectation_config.meta["name"]: r for r in result.results}
    return [_outcome(table, check, by_name[check.name]) for check in table.checks]


def _outcome(table: Table, check: Check, r: Any) -> Outcome:
    """Turn one GE ExpectationValidationResult into an Outcome with offenders named."""
    res = r.result or {}
    error = _gx_error(r.exception_info or {})
    index = list(res.get("unexpected_index_list") or [])
    offenders = _offenders(table, check, index, list(res.get("unexpected_list") or []))
    observed = res.get("observed_value", res.get("unexpected_count"))
    if check.gx_class == "ExpectTableColumnsToMatchSet" and isinstance(observed, list):
        observed = [c for c in observed if c != "where"]  # our offender-naming column, not data
    kwargs = {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"}
    return Outcome(
        name=check.name, table=table.name, description=check.description,
        expectation=r.expectation_config.type, kwargs=kwargs, success=bool(r.success) and error is None,
        observed=observed, element_count=res.get("element_count"),
        offender_count=len(index) or int(res.get("unexpected_count") or 0), offenders=offenders, error=error,
    )


def _gx_error(info: dict) -> str | None:
    """The message of an exception GE caught, if any.

    GE reports either one {"raised_exception", "exception_message", ...} dict or, when a metric
    failed, a dict of them keyed by metric id.
    """
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    for e in entries:
        if e.get("raised_exception"):
            return str(e.get("exception_message") or "unknown error")
    return None


def _offenders(table: Table, check: Check, index: list, values: list) -> list[Offender]:
    """The first MAX_OFFENDERS unexpected rows, named by their `where` (and sample id).

    For uniqueness checks each offender's note names the other rows sharing its value, and says
    whether they sit in different splits or carry different labels (leakage, contradictory labels).
    """
    frame = table.frame
    unique_col = check.kwargs["column"] if check.gx_class == "ExpectColumnValuesToBeUnique" else None
    pair = (check.kwargs.get("column_A"), check.kwargs.get("column_B"))
    out = []
    for idx, value in list(zip(index, values + [None] * (len(index) - len(values))))[:MAX_OFFENDERS]:
        if pair[0] and isinstance(value, (list, tuple)) and len(value) == 2:
            value = dict(zip(pair, value))  # {"split": "train", "split_in_arrays": "test"}
        sid = frame.at[idx, "sample_id"] if "sample_id" in frame else None
        out.append(Offender(
            where=str(frame.at[idx, "where"]), value=value,
            sample_id=int(sid) if sid is not None and _is_number(sid) else None,
            note=_duplicate_note(frame, unique_col, idx) if unique_col else "",
        ))
    return out


def _duplicate_note(frame: pd.DataFrame, column: str, idx: Any) -> str:
    """E.g. 'same sha256 as b.png (split test, label 3); in different splits (test, train) and ...'."""
    group = frame[frame[column] == frame.at[idx, column]]
    others = ", ".join(_where_split_label(group.loc[i]) for i in group.index if i != idx)
    flags = []
    if "split" in group and group["split"].nunique(dropna=False) > 1:
        flags.append(f"in different splits ({', '.join(sorted(map(str, group['split'].unique())))})")
    if "label" in group and group["label"].nunique(dropna=False) > 1:
        labels = ", ".join(short(v) for v in sorted(group["label"].unique()))
        flags.append(f"with different labels ({labels})")
    return f"same {column} as {others}" + ("; " + " and ".join(flags) if flags else "")


def _where_split_label(row: pd.Series) -> str:
    bits = [f"split {row['split']}"] if "split" in row else []
    bits += [f"label {short(row['label'])}"] if "label" in row else []
    return f"{row['where']}" + (f" ({', '.join(bits)})" if bits else "")


def _is_number(v: Any) -> bool:
    """A real number that is not NaN (pandas fills missing numbers with NaN)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not math.isnan(float(v))

