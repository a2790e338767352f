"""The data gate's tables: everything checked, as small pandas tables with the expectations to run on each.

One row per thing that can be at fault, with a `where` column naming it (a file, a split file, a
split/class pair); each table carries the GE expectations (Checks) to validate it with.

Tables:
  manifest       one row per manifest.csv row        (columns, nulls, value sets, ranges, uniqueness)
  class_counts   one row per (split, class)           (at least N samples of each class in each split)
  splits         one row per {split}.safetensors      (readable, shape, dtypes, lengths, sizes add up)
  samples        one row per sample id (outer join of manifest and arrays: split and label agree)
  groups         one row per value of the data.group column, when there is one (never in two splits)
  raw_files      one row per manifest file            (exists under the raw dir, sha256 unchanged)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors import SafetensorError, safe_open

from lathe.data.contract import Task
from lathe.data.ingest import MANIFEST_COLUMNS, SPLITS, resolve_inside
from lathe.data.params import ValidateParams
from lathe.errors import DataError
from lathe.io import load_arrays, sha256_file

NUMERIC_COLUMNS = ("sample_id", "label_index", "src_width", "src_height", "src_bit_depth", "pixel_mean", "pixel_std")
ARRAY_DTYPES = {"images": "uint8", "labels": "int64", "sample_ids": "int64"}


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
    in_set: list[tuple[str, list[object]]] = [("label", list(task.classes)), ("label_index", list(range(task.num_classes))), ("split", list(SPLITS)),
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
