"""The data gate's report: what each expectation found, and result.json / summary.md rendered from it.

An Outcome is one expectation's result (name, success, observed value, offending rows named by
their `where`); a ValidationReport holds them all with the statistics. Both files are stable
across runs: no timestamps or run ids.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lathe.errors import ValidationFailed
from lathe.io import write_json, write_text
from lathe.markdown import markdown_table

RESULT_FILE = "result.json"
SUMMARY_FILE = "summary.md"
MAX_OFFENDERS = 20  # offenders kept per expectation in result.json; the count is always exact
MESSAGE_OFFENDERS = 10  # offenders named per expectation in the error message and summary


@dataclass(frozen=True)
class Offender:
    """One row that broke an expectation: what it is, and the value that was wrong."""

    where: str  # a raw file (images/x.png), a split file (val.safetensors) or "split val, class 2"
    value: Any = None
    sample_id: int | None = None
    note: str = ""

    def describe(self) -> str:
        parts = [short(self.value)] if self.value is not None else []
        if self.note:
            parts.append(self.note)
        return f"{self.where} ({'; '.join(parts)})" if parts else self.where


@dataclass(frozen=True)
class Outcome:
    """The result of one expectation, in the shape result.json stores."""

    name: str  # stable id, e.g. "defect_probability_in_set"
    table: str
    description: str  # what was expected, in words
    expectation: str  # the GE expectation type, e.g. expect_column_values_to_be_in_set
    kwargs: dict[str, Any]
    success: bool
    observed: Any  # observed value (aggregates) or number of unexpected rows (per-row checks)
    element_count: int | None
    offender_count: int
    offenders: list[Offender] = field(default_factory=list)  # first MAX_OFFENDERS
    error: str | None = None  # GE raised while evaluating (counts as a failure)

    def describe_failure(self, limit: int = MESSAGE_OFFENDERS) -> str:
        """One line: name, what was expected, and the offenders (or the observed value)."""
        head = f"{self.name} ({self.description})"
        if self.error:
            return f"{head}: could not be evaluated: {self.error}"
        if not self.offender_count:
            return f"{head}: observed {short(self.observed)}"
        listed = ", ".join(o.describe() for o in self.offenders[:limit])
        more = self.offender_count - min(limit, len(self.offenders))
        tail = f", and {more} more (see {RESULT_FILE})" if more > 0 else ""
        return f"{head}: {self.offender_count} offender(s): {listed}{tail}"


@dataclass(frozen=True)
class ValidationReport:
    """Everything the gate found; `to_json` is result.json, `to_markdown` is summary.md."""

    success: bool
    statistics: dict[str, Any]
    expectations: list[Outcome]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.expectations if not o.success]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (no NaN), stable across runs: no timestamps or run ids."""
        return _jsonable({
            "success": self.success,
            "failed": [o.name for o in self.failed],
            "statistics": self.statistics,
            "expectations": [asdict(o) for o in self.expectations],
        })

    def to_markdown(self) -> str:
        """A short human summary: verdict, counts per split x class, a table of expectations."""
        st = self.statistics
        n_ok = sum(o.success for o in self.expectations)
        lines = [
            f"# Data validation: {'PASSED' if self.success else 'FAILED'}",
            "",
            f"{n_ok} of {len(self.expectations)} expectations met; {st.get('rows', 0)} manifest rows; "
            f"image size {st.get('image_size')} px; manifest sha256 `{str(st.get('manifest_sha256'))[:12]}`; "
            f"Great Expectations {st.get('great_expectations_version')}.",
            "",
        ]
        counts = st.get("split_class_counts") or {}
        classes = st.get("classes") or []
        if counts:
            per_split = [[split, *(per.get(str(c), 0) for c in classes), sum(per.values())]
                         for split, per in counts.items()]
            table = markdown_table(["split", *classes, "total"], per_split, align=["", *["right"] * (len(classes) + 1)])
            lines += [table.removesuffix("\n"), ""]
        rows = []
        for o in self.expectations:
            offenders = ", ".join(x.where for x in o.offenders[:3])
            if o.offender_count > 3:
                offenders += f", +{o.offender_count - 3} more"
            observed = "error" if o.error else _observed_md(o)
            rows.append(["pass" if o.success else "**FAIL**", f"`{o.name}`: {_md(o.description)}", o.table,
                         _md(observed), _md(offenders)])
        lines.append(markdown_table(["result", "expectation", "table", "observed", "offenders"], rows).removesuffix("\n"))
        if self.failed:
            lines += ["", "## Failures", ""]
            for o in self.failed:
                lines.append(f"- {_md(o.describe_failure())}")
        return "\n".join(lines) + "\n"


def write_report(report: ValidationReport, out_dir: Path) -> tuple[Path, Path]:
    """Atomically write result.json and summary.md into `out_dir` (pass or fail)."""
    out_dir = Path(out_dir)
    write_json(out_dir / RESULT_FILE, report.to_json())
    write_text(out_dir / SUMMARY_FILE, report.to_markdown())
    return out_dir / RESULT_FILE, out_dir / SUMMARY_FILE


def raise_if_failed(report: ValidationReport) -> None:
    """Raise ValidationFailed naming each failed expectation and its offending files."""
    if report.success:
        return
    failed = report.failed
    lines = [f"data gate: {len(failed)} of {len(report.expectations)} expectations failed:"]
    lines += [f"  - {o.describe_failure()}" for o in failed]
    raise ValidationFailed("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Small helpers


def short(v: Any) -> str:
    """Human form of a value: integral floats as ints, sha256 hex shortened, dicts as k=v."""
    if isinstance(v, dict):
        return ", ".join(f"{k}={short(x)}" for k, x in v.items())
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "empty"
        return str(int(v)) if float(v).is_integer() else f"{float(v):g}"
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12] + "..."
    if v is None:
        return "empty"
    return str(v)


def _observed_md(o: Outcome) -> str:
    """Observed value for the summary table: 'k unexpected' for per-row checks, lists counted."""
    if o.element_count is not None:
        return f"{o.offender_count} of {o.element_count} unexpected"
    if isinstance(o.observed, list):
        return f"{len(o.observed)} columns" if o.expectation.startswith("expect_table_columns") else \
            f"{len(o.observed)} values"
    return short(o.observed)


def _md(text: str) -> str:
    """Escape a table cell for Markdown."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _jsonable(obj: Any) -> Any:
    """Numpy scalars -> Python, NaN/inf -> None, tuples -> lists, recursively (write_json forbids NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
