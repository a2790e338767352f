"""The raw layout's reader and writer (labels.csv, lathe.data.contract) and its sources: the ELPV
importer and a synthetic EL-cell generator (the try-it data). Only this module names ELPV's classes
and columns."""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lathe.data.contract import LABELS_FILE, REQUIRED_COLUMNS
from lathe.errors import DataError, problem_list
from lathe.io import write_bytes, write_text

MAX_LABELS_BYTES = 256 * 2**20  # a labels.csv larger than this is refused before it is parsed
# ELPV's four grades as class names, in index order (defect probability 0, 1/3, 2/3, 1), and its metadata.
ELPV_CLASSES = ("functional", "possibly_defective", "probably_defective", "defective")
ELPV_METADATA = ("defect_probability", "cell_type")
ELPV_PROBABILITIES = (0.0, round(1 / 3, 6), round(2 / 3, 6), 1.0)  # grade k has probability k/3


@dataclass(frozen=True)
class RawSample:
    """One row of labels.csv: the file, its class name and its metadata columns (as text)."""

    file: str  # relative to the raw root, forward slashes
    label: str
    meta: dict[str, str] = field(default_factory=dict)


def read_labels_text(path: Path) -> str:
    """labels.csv as text: UTF-8 with or without a BOM, at most MAX_LABELS_BYTES."""
    if not path.is_file():
        raise DataError(f"{path}: labels file not found (expected columns {','.join(REQUIRED_COLUMNS)}, "
                        "more columns are metadata)")
    if path.stat().st_size > MAX_LABELS_BYTES:
        raise DataError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_LABELS_BYTES} a labels file may have")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a BOM (Excel's UTF-8 CSV) is dropped, not a column name
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc


def parse_labels(raw_dir: Path) -> tuple[list[tuple[int, RawSample]], list[str], list[str]]:
    """Every row of `raw_dir/labels.csv` that parses, with its line number; one problem line per row
    that does not (naming the file, line and field); and the metadata column names. A missing or
    unreadable file or header raises DataError."""
    path = Path(raw_dir) / LABELS_FILE
    reader = csv.DictReader(io.StringIO(read_labels_text(path)))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; header is {','.join(header) or '(empty)'}")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes or "" in header:
        raise DataError(f"{path}: column names must be distinct and non-empty; header is {','.join(header)}")
    reader.fieldnames = header
    meta_cols = [h for h in header if h not in REQUIRED_COLUMNS]
    rows, problems = [], []
    for line_no, row in enumerate(reader, start=2):
        file = (row.get("file") or "").strip()
        where = f"{path}:{line_no} ({file or 'no file name'})"
        label = (row.get("label") or "").strip()
        if None in row:  # more cells than header columns
            problems.append(f"{where}: {len(header) + len(row[None])} cells, but the header has {len(header)}")
        elif not file:
            problems.append(f"{where}: empty file name")
        elif not label:
            problems.append(f"{where}: empty label")
        else:
            rows.append((line_no, RawSample(file, label, {c: (row.get(c) or "").strip() for c in meta_cols})))
    return rows, problems, meta_cols


def read_labels(raw_dir: Path) -> list[RawSample]:
    """Every row of `raw_dir/labels.csv`; a DataError names every bad row at once."""
    path = Path(raw_dir) / LABELS_FILE
    rows, problems, _ = parse_labels(raw_dir)
    if problems:
        raise DataError(problem_list(f"{len(problems)} bad row(s) in {path}:", problems))
    if not rows:
        raise DataError(f"{path}: no samples listed")
    return [s for _, s in rows]


def write_labels(raw_dir: Path, samples: list[RawSample], meta_columns: tuple[str, ...] | list[str] = ()) -> None:
    """Write labels.csv: file, label, then `meta_columns` from each sample's metadata."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*REQUIRED_COLUMNS, *meta_columns])
    for s in samples:
        writer.writerow([s.file, s.label, *(s.meta.get(c, "") for c in meta_columns)])
    write_text(Path(raw_dir) / LABELS_FILE, buf.getvalue())


def elpv_source_dir() -> Path:
    """The data folder of the installed `elpv-dataset` package."""
    try:
        import elpv_dataset
    except ImportError as exc:  # pragma: no cover - it is a locked dependency
        raise DataError("the elpv-dataset package is not installed (pip install elpv-dataset)") from exc
    return Path(elpv_dataset.__file__).parent / "data"


def import_elpv(dest: Path, source: Path | None = None) -> int:
    """Copy ELPV into the raw layout at `dest`, byte for byte; returns the sample count.

    Deterministic: image bytes are copied unchanged and labels.csv keeps the package's spelling
    of each probability, so the folder's DVC md5 is the same on every machine. The label is the
    grade's class name (ELPV_CLASSES); the probability and the cell type stay as metadata columns.
    """
    source = Path(source) if source is not None else elpv_source_dir()
    labels = source / LABELS_FILE
    if not labels.is_file():
        raise DataError(f"{labels}: ELPV labels not found")
    samples = []
    for line_no, line in enumerate(labels.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise DataError(f"{labels}:{line_no}: expected 'path probability type', got {line!r}")
        rel, prob, cell_type = parts
        try:
            grade = ELPV_PROBABILITIES.index(round(float(prob), 6))
        except ValueError:
            raise DataError(f"{labels}:{line_no}: defect probability {prob!r} is not one of 0, 1/3, 2/3, 1") from None
        samples.append(RawSample(rel, ELPV_CLASSES[grade], {"defect_probability": prob, "cell_type": cell_type}))
    dest = Path(dest)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for s in samples:
        src = source / s.file
        if not src.is_file():
            raise DataError(f"{src}: listed in {labels} but missing")
        target = dest / s.file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    write_labels(dest, samples, ELPV_METADATA)
    return len(samples)


@dataclass(frozen=True)
class Grade:
    """How one defect grade (class 0..3) of a synthetic cell looks; each range is drawn per image.

    Lengths, widths and radii are fractions of the image side, so the look does not depend on `size`.
    """

    cracks: tuple[int, int]  # dark crack segments, inclusive range
    length: tuple[float, float]
    width: tuple[float, float]
    darken: tuple[float, float]  # a crack multiplies the pixels it covers by this
    dead_radius: tuple[float, float] = (0.0, 0.0)  # an electrically dead (dark) ellipse; 0: none
    dead_level: tuple[float, float] = (0.0, 0.0)  # its gray level, 8-bit


# The number, darkness and extent of defects grow with the grade, and neighbouring grades overlap a
# little; with the per-image gain, grain and noise of `synth_image` the classes are learnable by a
# small CNN from a few dozen images, but not separable by eye at every sample. A grade-0 cell may
# carry a faint, harmless line (a distractor, as printed fingers are in real EL images).
GRADES = {
    0: Grade(cracks=(0, 1), length=(0.2, 0.5), width=(0.03, 0.05), darken=(0.85, 0.95)),
    1: Grade(cracks=(1, 2), length=(0.3, 0.5), width=(0.04, 0.06), darken=(0.45, 0.65)),
    2: Grade(cracks=(1, 3), length=(0.35, 0.6), width=(0.05, 0.08), darken=(0.3, 0.5),
             dead_radius=(0.06, 0.14), dead_level=(35, 70)),
    3: Grade(cracks=(1, 4), length=(0.4, 0.7), width=(0.05, 0.08), darken=(0.2, 0.4),
             dead_radius=(0.13, 0.26), dead_level=(10, 40)),
}


def _line_mask(rng: np.random.Generator, size: int, length: float, width: float) -> np.ndarray:
    """(size, size) bool: a straight crack `length` px long and `width` px wide, at a random angle and place."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
    angle = rng.uniform(0, np.pi)
    dy, dx = np.sin(angle), np.cos(angle)
    along = (yy - cy) * dy + (xx - cx) * dx  # signed distance along the crack from its centre, px
    across = np.abs((yy - cy) * dx - (xx - cx) * dy)
    return (np.abs(along) <= length / 2) & (across <= max(width, 1.0) / 2)


def synth_image(rng: np.random.Generator, size: int, severity: int, cell_type: str) -> np.ndarray:
    """A toy EL cell image, (size, size) uint8: busbars, grain (poly), per-image gain and noise, and the
    cracks and dead area of grade `severity` (0..3, GRADES)."""
    g = GRADES[severity]
    base = 150.0 if cell_type == "mono" else 120.0
    img = np.full((size, size), base * rng.normal(1.0, 0.07), dtype=np.float32)
    if cell_type == "poly":  # grain texture
        img += rng.normal(0, 10, (size, size)).astype(np.float32)
    img += rng.normal(0, 5, (size, size)).astype(np.float32)
    for x in (size // 3, 2 * size // 3):  # busbars
        img[:, x - 1 : x + 1] = 40
    for _ in range(int(rng.integers(g.cracks[0], g.cracks[1] + 1))):
        mask = _line_mask(rng, size, rng.uniform(*g.length) * size, rng.uniform(*g.width) * size)
        img[mask] *= rng.uniform(*g.darken)
    if g.dead_radius[1] > 0:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
        ry, rx = rng.uniform(*g.dead_radius, 2) * size
        dead = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img[dead] = rng.uniform(*g.dead_level) + rng.normal(0, 3, int(dead.sum()))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate_raw(dest: Path, per_class_type: int = 6, size: int = 48, seed: int = 0) -> int:
    """Write a small deterministic raw-layout dataset shaped like ELPV (its 4 classes x 2 cell types x
    `per_class_type`, the same labels.csv columns)."""
    rng = np.random.default_rng(seed)
    dest = Path(dest)
    samples = []
    for cls in range(4):
        for cell_type in ("mono", "poly"):
            for k in range(per_class_type):
                name = f"images/c{cls}_{cell_type}_{k:03d}.png"
                buf = io.BytesIO()
                Image.fromarray(synth_image(rng, size, cls, cell_type)).save(buf, format="PNG")
                write_bytes(dest / name, buf.getvalue())
                samples.append(RawSample(name, ELPV_CLASSES[cls], {"defect_probability": repr(cls / 3),
                                                                    "cell_type": cell_type}))
    write_labels(dest, samples, ELPV_METADATA)
    return len(samples)
