"""Ingest: decode and resize raw images, derive the 4 classes, split stratified, build the manifest."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from lathe.config import IngestParams
from lathe.data import RawSample, read_labels
from lathe.errors import DataError
from lathe.io import load_arrays, save_arrays, sha256_bytes, write_text

SPLITS = ("train", "val", "test")
CELL_TYPES = ("mono", "poly")
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


def load_samples(raw_dir: Path, samples: list[RawSample], size: int) -> tuple[list[dict], np.ndarray]:
    """Read, hash and decode every listed image; all bad files are reported together."""
    records, images, problems = [], [], []
    for s in samples:
        path = resolve_inside(raw_dir, s.file)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            problems.append(f"{path}: listed in labels.csv but missing")
            continue
        except OSError as exc:
            problems.append(f"{path}: cannot read ({exc.strerror})")
            continue
        try:
            img = decode_gray(data, str(path))
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
    if problems:
        raise DataError(f"{len(problems)} unusable image file(s):\n" + "\n".join(problems))
    return records, np.stack(images)  # (N, size, size) uint8


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
    samples = read_labels(raw_dir)
    records, images = load_samples(raw_dir, samples, cfg.image_size)
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
