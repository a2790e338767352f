"""Ingest: decode and resize the raw images (lathe.data.images), split them stratified (and grouped),
and write the prepared data: one safetensors file per split, manifest.csv, and task.json (the contract
every later stage reads)."""

from __future__ import annotations

import csv
import difflib
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from lathe.data.contract import COMPUTED_COLUMNS, LABELS_FILE, DataParams, Task, task_of, write_task
from lathe.data.images import decode_image, header_of, pixel_stats, resize_image
from lathe.data.params import IngestParams
from lathe.data.raw import RawSample, parse_labels
from lathe.errors import DataError, problem_list
from lathe.io import load_arrays, save_arrays, sha256_bytes, write_text

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = COMPUTED_COLUMNS  # then the labels.csv metadata columns, in their order


@dataclass(frozen=True)
class ManifestRow:
    """One sample: its id and split, and the values of MANIFEST_COLUMNS and the metadata columns."""

    sample_id: int
    split: str
    values: dict  # file, sha256, label, label_index, src_*, pixel_mean/std (8-bit units), metadata

    @property
    def label_index(self) -> int:
        return int(self.values["label_index"])


@dataclass(frozen=True)
class LabelScan:
    """labels.csv read in one pass: the usable rows (line number, sample), every problem found, and
    the metadata column names."""

    rows: list[tuple[int, RawSample]]
    problems: list[str]
    metadata: list[str]


def resolve_inside(raw_dir: Path, rel: str) -> Path:
    """The file's path under `raw_dir`; refuses absolute paths and `..` escapes."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise DataError(f"{raw_dir / LABELS_FILE}: file {rel!r} points outside {raw_dir}")
    return Path(raw_dir) / p


def scan_labels(raw_dir: Path, data: DataParams) -> LabelScan:
    """Parse labels.csv and check every row against the contract without stopping at the first:
    labels outside `data.classes`, empty stratify/group values, metadata columns the params name but
    the file lacks, duplicate and escaping file names. Files are not opened (see `file_problems`)."""
    raw_dir = Path(raw_dir)
    labels = raw_dir / LABELS_FILE
    parsed, problems, metadata = parse_labels(raw_dir)
    missing = [c for c in data.metadata_columns if c not in metadata]
    if missing:
        return LabelScan([], problems + [f"{labels}: no column(s) {', '.join(missing)}, which params data.stratify/"
                                         f"data.group name; the file has {', '.join(metadata) or 'no metadata'}"],
                         metadata)
    clash = [c for c in metadata if c in COMPUTED_COLUMNS]
    if clash:
        return LabelScan([], problems + [f"{labels}: metadata column(s) {', '.join(clash)} clash with the columns "
                                         "ingest computes; rename them"], metadata)
    rows: list[tuple[int, RawSample]] = []
    first_line: dict[str, int] = {}
    for line_no, s in parsed:
        where = f"{labels}:{line_no} ({s.file})"
        bad = []
        if s.label not in data.classes:
            hint = difflib.get_close_matches(s.label, data.classes, n=1)
            bad.append(f"label {s.label[:60]!r} is not one of data.classes ({', '.join(data.classes)})"
                       + (f"; did you mean {hint[0]!r}?" if hint else ""))
        bad += [f"empty {c} (params data.stratify/data.group use it)" for c in data.metadata_columns if not s.meta[c]]
        try:
            resolve_inside(raw_dir, s.file)
        except DataError:
            bad.append(f"file {s.file!r} points outside {raw_dir}")
        if s.file in first_line:
            bad.append(f"file listed again (first on line {first_line[s.file]})")
        else:
            first_line[s.file] = line_no
        problems += [f"{where}: {b}" for b in bad]
        if not bad:
            rows.append((line_no, s))
    return LabelScan(rows, problems, metadata)


def read_problem(exc: OSError, where: str, path: Path) -> str:
    """One line for a listed file that cannot be read."""
    if isinstance(exc, FileNotFoundError):
        return f"{where}: file not found ({path})"
    return f"{where}: cannot read {path} ({exc.strerror or exc})"


def file_problems(raw_dir: Path, rows: list[tuple[int, RawSample]], min_side: int = 1,
                  max_pixels: int | None = None) -> list[str]:
    """Every listed file that is missing, unreadable, not a supported image (by its header), larger than
    `max_pixels` or smaller than `min_side` px. Reads headers only: fast enough for a pre-run check."""
    labels, out = Path(raw_dir) / LABELS_FILE, []
    for line_no, s in rows:
        where, path = f"{labels}:{line_no} ({s.file})", resolve_inside(raw_dir, s.file)
        try:
            with open(path, "rb") as fh:
                width, height = header_of(fh, where, max_pixels)
        except OSError as exc:
            out.append(read_problem(exc, where, path))
            continue
        except DataError as exc:
            out.append(str(exc))
            continue
        if min(width, height) < min_side:
            out.append(f"{where}: image is {width}x{height} px, smaller than {min_side} px on a side")
    return out


def load_samples(raw_dir: Path, rows: list[tuple[int, RawSample]], size: int,
                 data: DataParams) -> tuple[list[dict], np.ndarray, list[str]]:
    """Read, hash and decode every listed image: records, the usable images ((N, S, S) uint8 gray or
    (N, 3, S, S) uint8 RGB) and one problem line per file that is missing or does not decode."""
    records, images, problems = [], [], []
    labels = Path(raw_dir) / LABELS_FILE
    for line_no, s in rows:
        where, path = f"{labels}:{line_no} ({s.file})", resolve_inside(raw_dir, s.file)
        try:
            blob = path.read_bytes()
        except OSError as exc:
            problems.append(read_problem(exc, where, path))
            continue
        try:
            img = decode_image(blob, where, data.channels, data.max_pixels)
        except DataError as exc:
            problems.append(str(exc))
            continue
        mean, std = pixel_stats(img.pixels)
        records.append({
            "file": s.file, "sha256": sha256_bytes(blob), "label": s.label, "label_index": data.classes.index(s.label),
            "src_width": img.width, "src_height": img.height, "src_mode": img.mode, "src_bit_depth": img.bit_depth,
            "pixel_mean": mean, "pixel_std": std, **s.meta,
        })
        small = resize_image(img.pixels, size, data.resize)
        images.append(small if small.ndim == 2 else np.ascontiguousarray(small.transpose(2, 0, 1)))
    stacked = np.stack(images) if images else np.zeros(empty_shape(size, data.channels), np.uint8)
    return records, stacked, problems


def empty_shape(size: int, channels: int) -> tuple[int, ...]:
    """Shape of an empty image stack: (0, S, S) gray, (0, C, S, S) colour."""
    return (0, size, size) if channels == 1 else (0, channels, size, size)


def stratified_split(strata: list[tuple], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Assign each index a split so every stratum (e.g. class x cell type) is split in proportion."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, key in enumerate(strata):
        groups[key].append(i)
    rng = np.random.default_rng(seed)
    out = ["train"] * len(strata)
    for key in sorted(groups, key=repr):
        idx = np.array(groups[key])
        rng.shuffle(idx)
        n = len(idx)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:  # small strata still reach every split
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        for i in idx[:n_test]:
            out[i] = "test"
        for i in idx[n_test : n_test + n_val]:
            out[i] = "val"
    return out


def grouped_split(strata: list[tuple], groups: list[str], val_fraction: float, test_fraction: float, seed: int,
                  column: str) -> list[str]:
    """Like stratified_split, but whole groups move together: no group value is in two splits.

    Each group takes the stratum most of its samples have (ties: the smallest); within a stratum the
    groups are shuffled and dealt to test, then val, until each holds its fraction of the stratum's
    samples (at least one group each when the stratum has three or more groups). Every split must end
    up with a group: otherwise the data cannot be split this way, and the error says so."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_stratum: dict[tuple, list[str]] = defaultdict(list)
    for g, idx in members.items():
        counts: defaultdict[tuple, int] = defaultdict(int)
        for i in idx:
            counts[strata[i]] += 1
        best = min(counts, key=lambda k: (-counts[k], repr(k)))
        by_stratum[best].append(g)
    rng = np.random.default_rng(seed)
    out = ["train"] * len(strata)
    for key in sorted(by_stratum, key=repr):
        names = sorted(by_stratum[key])
        order = rng.permutation(len(names))
        n = sum(len(members[g]) for g in names)
        want = {"test": n * test_fraction, "val": n * val_fraction}
        dealt = {"test": 0, "val": 0}
        for j in order:
            g = names[j]
            size = len(members[g])
            # a group joins a split while that brings the split closer to its share (or the split is
            # still empty and the stratum has groups to spare); the rest train
            split = next((s for s in ("test", "val")
                          if (dealt[s] == 0 and len(names) >= 3) or dealt[s] + size / 2 <= want[s]), "train")
            if split != "train":
                dealt[split] += size
            for i in members[g]:
                out[i] = split
    empty = [s for s in SPLITS if s not in out]
    if empty:
        raise DataError(f"data.group {column!r}: {len(members)} group(s) cannot fill train, val and test without a "
                        f"group straddling two splits (split(s) {', '.join(empty)} would be empty); add groups, "
                        "or drop data.group")
    return out


def split_samples(labels: list[int], metadata: list[dict[str, str]], data: DataParams, val_fraction: float,
                  test_fraction: float, seed: int) -> list[str]:
    """The split of every sample from its class index and metadata: stratified on `data.stratify`,
    grouped on `data.group` when set. A stratum holds the class index for `label` (not the name: ELPV
    keeps the splits it had when its labels were grade numbers) and the value of any other column."""
    strata = [tuple(lab if c == "label" else meta[c] for c in data.stratify) for lab, meta in zip(labels, metadata)]
    if data.group is None:
        return stratified_split(strata, val_fraction, test_fraction, seed)
    return grouped_split(strata, [m[data.group] for m in metadata], val_fraction, test_fraction, seed, data.group)


def ingest(raw_dir: Path, cfg: IngestParams, data: DataParams) -> tuple[list[ManifestRow], np.ndarray, Task]:
    """Raw folder -> manifest rows, images in manifest order, and the task they make."""
    scan = scan_labels(raw_dir, data)
    records, images, unusable = load_samples(raw_dir, scan.rows, cfg.image_size, data)
    problems = scan.problems + unusable
    if problems:
        raise DataError(problem_list(f"{len(problems)} problem(s) in {Path(raw_dir) / LABELS_FILE} "
                                     "and the files it lists:", problems))
    if not records:
        raise DataError(f"{Path(raw_dir) / LABELS_FILE}: no samples listed")
    splits = split_samples([r["label_index"] for r in records], records, data, cfg.val_fraction, cfg.test_fraction,
                           cfg.seed)
    rows = [ManifestRow(sample_id=i, split=sp, values=r) for i, (r, sp) in enumerate(zip(records, splits))]
    return rows, images, task_of(data, cfg.image_size, scan.metadata)


def write_prepared(out_dir: Path, rows: list[ManifestRow], images: np.ndarray, task: Task) -> None:
    """Write task.json, manifest.csv and one safetensors file per split: images, labels, sample ids."""
    out_dir = Path(out_dir)
    for split in SPLITS:
        idx = [r.sample_id for r in rows if r.split == split]
        save_arrays(
            out_dir / f"{split}.safetensors",
            {
                "images": images[idx] if idx else np.zeros(empty_shape(task.image_size, task.channels), np.uint8),
                "labels": np.array([rows[i].label_index for i in idx], dtype=np.int64),
                "sample_ids": np.array(idx, dtype=np.int64),
            },
            # One metadata key only: safetensors writes metadata from a hash map, so several keys
            # come out in random order and the file would not be byte-stable.
            metadata={"image_size": str(task.image_size)},
        )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*MANIFEST_COLUMNS, *task.metadata], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({"sample_id": r.sample_id, "split": r.split, **r.values})
    write_text(out_dir / MANIFEST_FILE, buf.getvalue())
    write_task(out_dir, task)


def read_manifest(path: Path) -> list[dict]:
    """manifest.csv as a list of dicts (strings), for validation and lineage."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def load_split(prepared_dir: Path, split: str) -> dict[str, np.ndarray]:
    """One split's arrays: images (N, S, S) or (N, C, S, S) uint8, labels (N,) int64, sample_ids (N,) int64."""
    path = Path(prepared_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise DataError(f"{path}: prepared split not found (run the ingest stage)")
    return load_arrays(path)


def image_geometry(images: np.ndarray, where: Path | str) -> tuple[int, int]:
    """(channels, side) of a prepared image stack: (N, S, S) uint8 gray or (N, C, S, S) uint8 colour."""
    square = images.ndim in (3, 4) and images.shape[-1] == images.shape[-2]
    if not square or images.dtype != np.uint8:
        raise DataError(f"{where}: images are {images.dtype} {images.shape}; expected (N, S, S) or (N, C, S, S) uint8")
    return (1 if images.ndim == 3 else int(images.shape[1])), int(images.shape[-1])
