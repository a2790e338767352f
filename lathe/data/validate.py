"""Validate: the data gate. A Great Expectations suite over the prepared data and the raw files.

Everything checked is first put into a small pandas table, one row per thing that can be at
fault, with a `where` column naming it (a file, a split file, a split/class pair). Each table is
validated by a real GE 1.x ExpectationSuite, so every check reports the same way: a name,
success, an observed value, and the offending rows mapped back to their `where`.

Tables:
  manifest       one row per manifest.csv row        (columns, nulls, value sets, ranges, uniqueness)
  class_counts   one row per (split, class)           (at least N samples of each class in each split)
  splits         one row per {split}.safetensors      (readable, shape, dtypes, lengths, sizes add up)
  samples        one row per sample id (outer join of manifest and arrays: split and label agree)
  groups         one row per value of the data.group column, when there is one (never in two splits)
  raw_files      one row per manifest file            (exists under the raw dir, sha256 unchanged)

Great Expectations is imported lazily: it takes ~5 s, and only this stage needs it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors import SafetensorError, safe_open

from lathe.data.contract import TASK_FILE, Task, read_task
from lathe.data.ingest import MANIFEST_COLUMNS, SPLITS, resolve_inside
from lathe.data.params import ValidateParams
from lathe.errors import DataError, ValidationFailed
from lathe.io import load_arrays, sha256_file, write_json, write_text

RESULT_FILE = "result.json"
SUMMARY_FILE = "summary.md"
MAX_OFFENDERS = 20  # offenders kept per expectation in result.json; the count is always exact
MESSAGE_OFFENDERS = 10  # offenders named per expectation in the error message and summary
NUMERIC_COLUMNS = ("sample_id", "label_index", "src_width", "src_height", "src_bit_depth", "pixel_mean", "pixel_std")
ARRAY_DTYPES = {"images": "uint8", "labels": "int64", "sample_ids": "int64"}


# ----------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Offender:
    """One row that broke an expectation: what it is, and the value that was wrong."""

    where: str  # a raw file (images/x.png), a split file (val.safetensors) or "split val, class 2"
    value: Any = None
    sample_id: int | None = None
    note: str = ""

    def describe(self) -> str:
        parts = [_short(self.value)] if self.value is not None else []
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
            return f"{head}: observed {_short(self.observed)}"
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
            lines += ["| split | " + " | ".join(classes) + " | total |",
                      "|---|" + "---:|" * (len(classes) + 1)]
            for split, per in counts.items():
                cells = [str(per.get(str(c), 0)) for c in classes]
                lines.append(f"| {split} | " + " | ".join(cells) + f" | {sum(per.values())} |")
            lines.append("")
        lines += ["| result | expectation | table | observed | offenders |", "|---|---|---|---|---|"]
        for o in self.expectations:
            offenders = ", ".join(x.where for x in o.offenders[:3])
            if o.offender_count > 3:
                offenders += f", +{o.offender_count - 3} more"
            observed = "error" if o.error else _observed_md(o)
            lines.append(
                f"| {'pass' if o.success else '**FAIL**'} | `{o.name}`: {_md(o.description)} | {o.table} "
                f"| {_md(observed)} | {_md(offenders)} |"
            )
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
# Checks and tables


@dataclass(frozen=True)
class Check:
    """One expectation to build: the GE class name, its kwargs, our name and description."""

    name: str
    description: str
    gx_class: str  # attribute of great_expectations.expectations, e.g. "ExpectColumnValuesToBeInSet"
    kwargs: dict[str, Any]


@dataclass
class Table:
    """A DataFrame to validate (it has a `where` column) and the checks to run on it."""

    name: str
    frame: pd.DataFrame
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, description: str, gx_class: str, **kwargs: Any) -> None:
        self.checks.append(Check(name, description, gx_class, kwargs))

    def has(self, *columns: str) -> bool:
        return all(c in self.frame.columns for c in columns)


def read_manifest_frame(prepared_dir: Path) -> pd.DataFrame:
    """manifest.csv as strings; only empty cells are null (a file named 'NA' stays a name)."""
    path = Path(prepared_dir) / "manifest.csv"
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (run the ingest stage)")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV manifest ({exc})") from exc


def typed_manifest(raw: pd.DataFrame) -> pd.DataFrame:
    """Numeric columns parsed (unparsable -> null, caught by the not-null checks), `where` added."""
    df = raw.copy()
    for col in NUMERIC_COLUMNS:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    files = df["file"] if "file" in df else pd.Series([None] * len(df), index=df.index, dtype=object)
    df["where"] = [f if isinstance(f, str) else f"manifest row {i + 2}" for i, f in enumerate(files)]
    return df


def manifest_table(df: pd.DataFrame, cfg: ValidateParams, task: Task) -> Table:
    """Expectations over manifest.csv itself."""
    t = Table("manifest", df)
    columns = [*MANIFEST_COLUMNS, *task.metadata]
    t.add("manifest_columns", f"has columns {', '.join(columns)}",
          "ExpectTableColumnsToMatchSet", column_set=columns, exact_match=False)
    t.add("row_count", f"between {cfg.min_rows} and {cfg.max_rows} rows",
          "ExpectTableRowCountToBeBetween", min_value=cfg.min_rows, max_value=cfg.max_rows)
    for col in [*MANIFEST_COLUMNS, *task.stratify_metadata]:
        if t.has(col):  # a missing column is reported once, by manifest_columns
            what = "no empty or non-numeric values" if col in NUMERIC_COLUMNS else "no empty values"
            t.add(f"{col}_not_null", f"{col}: {what}", "ExpectColumnValuesToNotBeNull", column=col)
    in_set = [("label", list(task.classes)), ("label_index", list(range(task.num_classes))), ("split", list(SPLITS)),
              ("src_bit_depth", [8, 16])]
    for col, allowed in in_set:
        if t.has(col):
            t.add(f"{col}_in_set", f"{col} is one of {', '.join(map(str, allowed))}",
                  "ExpectColumnValuesToBeInSet", column=col, value_set=list(allowed))
    unique = (("sample_id", "ids"), ("file", "file names"), ("sha256", "image bytes: no duplicate images"))
    for col, why in unique:
        if t.has(col):
            t.add(f"{col}_unique", f"{col} unique ({why})", "ExpectColumnValuesToBeUnique", column=col)
    if t.has("pixel_mean"):
        t.add("pixel_mean_in_range", f"source pixel mean in [{cfg.pixel_mean_min}, {cfg.pixel_mean_max}]",
              "ExpectColumnValuesToBeBetween", column="pixel_mean",
              min_value=cfg.pixel_mean_min, max_value=cfg.pixel_mean_max)
    if t.has("pixel_std"):
        t.add("pixel_std_min", f"source pixel std >= {cfg.pixel_std_min} (not blank)",
              "ExpectColumnValuesToBeBetween", column="pixel_std", min_value=cfg.pixel_std_min)
    for col in ("src_width", "src_height"):
        if t.has(col):
            t.add(f"{col}_min", f"{col} >= {cfg.source_min_side} px",
                  "ExpectColumnValuesToBeBetween", column=col, min_value=cfg.source_min_side)
    return t


def class_counts_table(df: pd.DataFrame, cfg: ValidateParams, task: Task) -> Table | None:
    """Samples per (split, class), zeros included: a class missing from a split is a row with 0."""
    if not {"split", "label"} <= set(df.columns):
        return None
    observed = df.groupby(["split", "label"]).size()
    rows = [
        {"where": f"split {s}, class {c}", "split": s, "label": c, "count": int(observed.get((s, c), 0))}
        for s in SPLITS for c in task.classes
    ]
    t = Table("class_counts", pd.DataFrame(rows))
    t.add("class_count_per_split",
          f"at least {cfg.min_per_class_per_split} sample(s) of each class in each split",
          "ExpectColumnValuesToBeBetween", column="count", min_value=cfg.min_per_class_per_split)
    return t


def _split_row(prepared_dir: Path, split: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One split file's facts (for the splits table) and its arrays ({} if unreadable)."""
    path = Path(prepared_dir) / f"{split}.safetensors"
    row: dict[str, Any] = {"where": path.name, "split": split, "status": "ok", "n": 0}
    try:
        arrays = load_arrays(path)
        with safe_open(str(path), framework="np") as fh:
            meta = fh.metadata() or {}
    except FileNotFoundError:
        row["status"] = "missing"
        return row, {}
    except (SafetensorError, OSError) as exc:
        row["status"] = f"unreadable: {exc}"
        return row, {}
    missing = [k for k in ARRAY_DTYPES if k not in arrays]
    if missing:
        row["status"] = f"missing array(s) {', '.join(missing)}"
        return row, {}
    images = arrays["images"]
    row["n"] = int(images.shape[0]) if images.ndim else 0
    row["image_hw"] = "x".join(map(str, images.shape[1:])) if images.ndim in (3, 4) else f"shape {images.shape}"
    row["dtypes"] = " ".join(f"{k}={arrays[k].dtype}" for k in ARRAY_DTYPES)
    row["lengths_match"] = all(arrays[k].shape[:1] == (row["n"],) for k in ARRAY_DTYPES)
    row["finite"] = all(bool(np.isfinite(a).all()) for a in arrays.values() if a.dtype.kind in "fc")
    row["meta_image_size"] = meta.get("image_size", "absent")
    return row, arrays


def splits_table(
    prepared_dir: Path, task: Task, n_manifest: int
) -> tuple[Table, dict[str, dict[str, np.ndarray]]]:
    """Expectations over the three split files; also returns their arrays for the samples table."""
    rows, loaded = [], {}
    for split in SPLITS:
        row, arrays = _split_row(prepared_dir, split)
        rows.append(row)
        if arrays:
            loaded[split] = arrays
    t = Table("splits", pd.DataFrame(rows))
    dtypes = " ".join(f"{k}={v}" for k, v in ARRAY_DTYPES.items())
    t.add("split_files_readable", "every split file exists and holds images, labels, sample_ids",
          "ExpectColumnValuesToBeInSet", column="status", value_set=["ok"])
    image_size = task.image_size
    if loaded:  # per-array checks only make sense for the files that loaded
        shape = [image_size, image_size] if task.channels == 1 else [task.channels, image_size, image_size]
        t.add("images_shape", f"images are (N, {', '.join(map(str, shape))})",
              "ExpectColumnValuesToBeInSet", column="image_hw", value_set=["x".join(map(str, shape))])
        t.add("array_dtypes", dtypes, "ExpectColumnValuesToBeInSet", column="dtypes", value_set=[dtypes])
        t.add("array_lengths_match", "images, labels and sample_ids have N entries each",
              "ExpectColumnValuesToBeInSet", column="lengths_match", value_set=[True])
        t.add("arrays_finite", "no NaN or inf in any array",
              "ExpectColumnValuesToBeInSet", column="finite", value_set=[True])
        t.add("image_size_metadata", f"safetensors metadata image_size = {image_size}",
              "ExpectColumnValuesToBeInSet", column="meta_image_size", value_set=[str(image_size)])
    t.add("split_sizes_sum", f"split sizes add up to the manifest's {n_manifest} rows",
          "ExpectColumnSumToBeBetween", column="n", min_value=n_manifest, max_value=n_manifest)
    return t, loaded


def samples_table(df: pd.DataFrame, loaded: dict[str, dict[str, np.ndarray]]) -> Table | None:
    """Manifest rows outer-joined with the arrays' rows on sample_id: split and label must agree."""
    if not {"sample_id", "split", "label_index"} <= set(df.columns):
        return None
    man = df[df["sample_id"].notna()]
    man = pd.DataFrame({
        "sample_id": man["sample_id"].astype("int64"), "file": man["where"], "split": man["split"],
        "label": man["label_index"],
    })
    parts = [
        pd.DataFrame({"sample_id": a["sample_ids"].astype("int64"), "split_in_arrays": split,
                      "label_in_arrays": a["labels"]})
        for split, a in loaded.items()
        # arrays of the wrong length or a non-integer id type are reported by the splits table
        if a["sample_ids"].shape == a["labels"].shape and a["sample_ids"].dtype.kind in "iu"
    ]
    arr = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["sample_id", "split_in_arrays", "label_in_arrays"])
    joined = man.merge(arr, on="sample_id", how="outer", sort=True)
    joined["where"] = [f if isinstance(f, str) else f"sample_id {i} (not in manifest)"
                       for f, i in zip(joined["file"], joined["sample_id"])]
    t = Table("samples", joined.reset_index(drop=True))
    t.add("arrays_split_match", "every manifest sample is in its split's arrays, and nothing else is",
          "ExpectColumnPairValuesToBeEqual", column_A="split", column_B="split_in_arrays")
    t.add("arrays_label_match", "array labels equal manifest label indices",
          "ExpectColumnPairValuesToBeEqual", column_A="label", column_B="label_in_arrays",
          ignore_row_if="either_value_is_missing")
    return t


def groups_table(df: pd.DataFrame, task: Task) -> Table | None:
    """One row per value of the task's group column: the splits its samples are in (must be one)."""
    if task.group is None or not {task.group, "split"} <= set(df.columns):
        return None
    per = df.groupby(task.group, dropna=False)["split"].agg(lambda s: ",".join(sorted(set(map(str, s)))))
    frame = pd.DataFrame({"where": [f"{task.group} {g}" for g in per.index], "splits": per.to_numpy()})
    t = Table("groups", frame)
    t.add("group_in_one_split", f"every {task.group} value is in exactly one split (no leakage between splits)",
          "ExpectColumnValuesToNotMatchRegex", column="splits", regex=",")
    return t


def _hash_raw(raw_dir: Path, rel: str) -> tuple[str, str | None]:
    """(status, sha256) of one listed raw file; status 'ok' or what is wrong with it."""
    try:
        path = resolve_inside(raw_dir, rel)
    except DataError:
        return f"outside {raw_dir}", None
    try:
        return "ok", sha256_file(path)
    except FileNotFoundError:
        return "missing", None
    except IsADirectoryError:
        return "a directory, not a file", None
    except OSError as exc:
        return f"unreadable ({exc.strerror})", None


def raw_files_table(df: pd.DataFrame, raw_dir: Path) -> Table | None:
    """Re-hash every listed raw file: proves the raw data now on disk is the data validated."""
    if not {"file", "sha256"} <= set(df.columns):
        return None
    listed = df[df["file"].notna()]
    checked = [_hash_raw(raw_dir, f) for f in listed["file"]]
    frame = pd.DataFrame({
        "where": listed["file"].to_numpy(),
        "sample_id": listed["sample_id"].to_numpy() if "sample_id" in listed else np.nan,
        "status": [c[0] for c in checked], "sha256": listed["sha256"].to_numpy(),
        "sha256_on_disk": [c[1] for c in checked],
    })
    t = Table("raw_files", frame)
    t.add("raw_files_exist", f"every manifest file exists under {raw_dir}",
          "ExpectColumnValuesToBeInSet", column="status", value_set=["ok"])
    t.add("raw_sha256_match", "every raw file's sha256 equals the manifest's (unchanged since ingest)",
          "ExpectColumnPairValuesToBeEqual", column_A="sha256", column_B="sha256_on_disk",
          ignore_row_if="either_value_is_missing")
    return t


# ----------------------------------------------------------------------------------------------
# Running the suites


def _gx() -> Any:
    """Import great_expectations quietly (no analytics), only when a validation runs."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
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


def _context(gx: Any) -> Any:
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
            sample_id=int(sid) if _is_number(sid) else None,
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
        labels = ", ".join(_short(v) for v in sorted(group["label"].unique()))
        flags.append(f"with different labels ({labels})")
    return f"same {column} as {others}" + ("; " + " and ".join(flags) if flags else "")


def _where_split_label(row: pd.Series) -> str:
    bits = [f"split {row['split']}"] if "split" in row else []
    bits += [f"label {_short(row['label'])}"] if "label" in row else []
    return f"{row['where']}" + (f" ({', '.join(bits)})" if bits else "")


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
    gx = _gx()
    source = _context(gx).data_sources.add_pandas(name="lathe")
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
        return {_short(k): int(v) for k, v in found}

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


# ----------------------------------------------------------------------------------------------
# Small helpers


def _is_number(v: Any) -> bool:
    """A real number that is not NaN (pandas fills missing numbers with NaN)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not math.isnan(float(v))


def _short(v: Any) -> str:
    """Human form of a value: integral floats as ints, sha256 hex shortened, dicts as k=v."""
    if isinstance(v, dict):
        return ", ".join(f"{k}={_short(x)}" for k, x in v.items())
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
    return _short(o.observed)


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
