"""Ingest: decode and resize raw images, derive the 4 classes, split stratified, build the manifest."""

from __future__ import annotations

import csv
import difflib
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from lathe.config import IngestParams
from lathe.data.raw import LABELS_FILE, RawSample, parse_labels
from lathe.errors import DataError, problem_list
from lathe.io import load_arrays, save_arrays, sha256_bytes, write_text

SPLITS = ("train", "val", "test")
CELL_TYPES = ("mono", "poly")
DEFECT_PROBABILITIES = (0.0, 1 / 3, 2 / 3, 1.0)  # the contract's values -> classes 0..3 (label_of)
PROB_DECIMALS = 6  # 1/3 is written 0.3333333333333333 or 0.333333; compare at this precision
MANIFEST_COLUMNS = (
    "sample_id", "file", "sha256", "defect_probability", "label", "cell_type", "split",
    "src_width", "src_height", "pixel_mean", "pixel_std",
)


@dataclass(frozen=True)
class ManifestRow:
    sample_id: int
    file: str
    sha256: str
    defect_probability: float
    label: int  # round(3 * defect_probability): 0 functional ... 3 defective
    cell_type: str
    split: str
    src_width: int
    src_height: int
    pixel_mean: float  # of the 8-bit source image
    pixel_std: float


def label_of(defect_probability: float) -> int:
    """Class index from the ELPV defect probability {0, 1/3, 2/3, 1} -> {0, 1, 2, 3}."""
    return int(round(3 * defect_probability))


def resolve_inside(raw_dir: Path, rel: str) -> Path:
    """The file's path under `raw_dir`; refuses absolute paths and `..` escapes."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise DataError(f"{raw_dir / 'labels.csv'}: file {rel!r} points outside {raw_dir}")
    return Path(raw_dir) / p


def decode_gray(data: bytes, where: str) -> np.ndarray:
    """Decode image bytes to (H, W) uint8 grayscale; the error names `where`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "I;16", "I", "RGB", "RGBA", "P", "LA"):
                raise DataError(f"{where}: unsupported image mode {im.mode}")
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: cannot decode image ({exc})") from exc


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 -> (size, size) uint8, area-averaged (antialiased, deterministic)."""
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def _listed(values: Sequence[object]) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclass(frozen=True)
class LabelScan:
    """labels.csv read in one pass: the usable rows (line number, sample) and every problem found."""

    rows: list[tuple[int, RawSample]]
    problems: list[str]


def scan_labels(raw_dir: Path, probabilities: Sequence[float] = DEFECT_PROBABILITIES,
                cell_types: Sequence[str] = CELL_TYPES) -> LabelScan:
    """Parse labels.csv and check every row against the contract without stopping at the first:
    unparsable fields, defect probabilities and cell types outside the allowed sets, duplicate and
    escaping file names. Files are not opened (see `file_problems`, `load_samples`)."""
    raw_dir = Path(raw_dir)
    labels = raw_dir / LABELS_FILE
    parsed, problems = parse_labels(raw_dir)
    allowed = {round(p, PROB_DECIMALS) for p in probabilities}
    rows, first_line = [], {}
    for line_no, s in parsed:
        where = f"{labels}:{line_no} ({s.file})"
        bad = []
        if round(s.defect_probability, PROB_DECIMALS) not in allowed:
            bad.append(f"defect_probability {s.defect_probability:g} is not one of {_listed(list(probabilities))}")
        if s.cell_type not in cell_types:
            hint = difflib.get_close_matches(s.cell_type, cell_types, n=1)
            bad.append(f"cell_type {s.cell_type!r} is not one of {_listed(list(cell_types))}"
                       + (f" (did you mean {hint[0]!r}?)" if hint else ""))
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
    return LabelScan(rows, problems)


def file_problems(raw_dir: Path, rows: list[tuple[int, RawSample]], min_side: int = 1) -> list[str]:
    """Every listed file that is missing, unreadable, not an image (by its header) or smaller than
    `min_side` px. Reads headers only: fast enough for a pre-run check of thousands of files."""
    labels, out = Path(raw_dir) / LABELS_FILE, []
    for line_no, s in rows:
        where, path = f"{labels}:{line_no} ({s.file})", resolve_inside(raw_dir, s.file)
        try:
            with Image.open(path) as im:
                width, height = im.size
        except FileNotFoundError:
            out.append(f"{where}: file not found ({path})")
            continue
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            out.append(f"{where}: not a readable image ({getattr(exc, 'strerror', None) or exc})")
            continue
        if min(width, height) < min_side:
            out.append(f"{where}: image is {width}x{height} px, smaller than {min_side} px on a side")
    return out


def load_samples(raw_dir: Path, rows: list[tuple[int, RawSample]],
                 size: int) -> tuple[list[dict], np.ndarray, list[str]]:
    """Read, hash and decode every listed image: records and (N, size, size) uint8 images of the
    usable ones, and one problem line per file that is missing or does not decode."""
    records, images, problems = [], [], []
    labels = Path(raw_dir) / LABELS_FILE
    for line_no, s in rows:
        where, path = f"{labels}:{line_no} ({s.file})", resolve_inside(raw_dir, s.file)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            problems.append(f"{where}: file not found ({path})")
            continue
        except OSError as exc:
            problems.append(f"{where}: cannot read {path} ({exc.strerror})")
            continue
        try:
            img = decode_gray(data, where)
        except DataError as exc:
            problems.append(str(exc))
            continue
        records.append({
            "file": s.file, "sha256": sha256_bytes(data), "defect_probability": s.defect_probability,
            "label": label_of(s.defect_probability), "cell_type": s.cell_type,
            "src_width": int(img.shape[1]), "src_height": int(img.shape[0]),
            "pixel_mean": round(float(img.mean()), 4), "pixel_std": round(float(img.std()), 4),
        })
        images.append(resize(img, size))
    stacked = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    return records, stacked, problems


def stratified_split(strata: list[tuple], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Assign each index a split so every stratum (class x cell type) is split in proportion."""
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


def ingest(raw_dir: Path, cfg: IngestParams) -> tuple[list[ManifestRow], np.ndarray]:
    """Raw folder -> manifest rows and (N, S, S) uint8 images in manifest order."""
    scan = scan_labels(raw_dir)
    records, images, unusable = load_samples(raw_dir, scan.rows, cfg.image_size)
    problems = scan.problems + unusable
    if problems:
        raise DataError(problem_list(f"{len(problems)} problem(s) in {Path(raw_dir) / LABELS_FILE} "
                                     "and the files it lists:", problems))
    if not records:
        raise DataError(f"{Path(raw_dir) / LABELS_FILE}: no samples listed")
    splits = stratified_split(
        [(r["label"], r["cell_type"]) for r in records], cfg.val_fraction, cfg.test_fraction, cfg.seed
    )
    rows = [ManifestRow(sample_id=i, split=sp, **r) for i, (r, sp) in enumerate(zip(records, splits))]
    return rows, images


def cell_type_code(cell_type: str) -> int:
    """0 mono, 1 poly, -1 anything else (validation reports it)."""
    return CELL_TYPES.index(cell_type) if cell_type in CELL_TYPES else -1


def write_prepared(out_dir: Path, rows: list[ManifestRow], images: np.ndarray, cfg: IngestParams) -> None:
    """Write manifest.csv and one safetensors file per split: images, labels, cell types, ids."""
    out_dir = Path(out_dir)
    for split in SPLITS:
        idx = [r.sample_id for r in rows if r.split == split]
        save_arrays(
            out_dir / f"{split}.safetensors",
            {
                "images": images[idx] if idx else np.zeros((0, cfg.image_size, cfg.image_size), np.uint8),
                "labels": np.array([rows[i].label for i in idx], dtype=np.int64),
                "cell_types": np.array([cell_type_code(rows[i].cell_type) for i in idx], dtype=np.int64),
                "sample_ids": np.array(idx, dtype=np.int64),
            },
            # One metadata key only: safetensors writes metadata from a hash map, so several keys
            # come out in random order and the file would not be byte-stable.
            metadata={"image_size": str(cfg.image_size)},
        )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(asdict(r))
    write_text(out_dir / "manifest.csv", buf.getvalue())


def read_manifest(path: Path) -> list[dict]:
    """manifest.csv as a list of dicts (strings), for validation and lineage."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def load_split(prepared_dir: Path, split: str) -> dict[str, np.ndarray]:
    """One split's arrays: images (N, S, S) uint8, labels (N,), cell_types (N,), sample_ids (N,)."""
    path = Path(prepared_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise DataError(f"{path}: prepared split not found (run the ingest stage)")
    return load_arrays(path)
