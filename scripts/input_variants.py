"""Other inputs for the same cells: rebuild a prepared folder's images another way, for teacher_sweep.

Not part of the pipeline (docs/teacher-experiments.md, 2026-12-06). Sample ids, splits and the
manifest stay those of `--prepared`; each split's `images` change (or, for `binary`, its labels):

- `stretch`: each 64 px image's 1st-99th percentile mapped to 0-255 (per-image contrast).
- `minpool`: the source resized to 4x the side (box), then the darkest pixel of each 4x4 block, so a
  crack one pixel wide at 4x survives instead of being averaged away.
- `ridge`: 3 channels: the prepared image, and the largest Hessian eigenvalue of the 4x source
  (positive across a dark line) at sigma 1 and 2 px, max-pooled back; one scale per channel, from train.
- `subset`: the images as they are, but only `--train-fraction` of the train split (a seeded draw
  within each class, so the class mix stays); val and test unchanged: a learning curve.
- `binary`: the images as they are, the labels folded into the packages' two outcomes (task.json's
  `defective` classes -> "defective", the rest -> "ok"): a network trained for the gate alone.

Then train on it with teacher_sweep's --prepared:

    python -m scripts.input_variants --variant ridge --prepared data/prepared --raw data/raw \\
        --out .lathe/sweep/prepared-ridge
    python -m scripts.teacher_sweep --name ridge --prepared .lathe/sweep/prepared-ridge --set ensemble.members=1
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file
from scipy import ndimage

from lathe.data.contract import TASK_FILE

SPLITS = ("train", "val", "test")
UPSCALE = 4  # the variants that read the source work at 4x the prepared side (256 px for 64 px)


def stretch(images: np.ndarray) -> np.ndarray:
    """(N, S, S) uint8 -> the same with each image's 1st-99th percentile spread over 0-255."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    lo, hi = (np.percentile(flat, q, axis=1, keepdims=True) for q in (1, 99))
    out = np.clip((flat - lo) / np.maximum(hi - lo, 1.0) * 255.0, 0, 255)
    return out.round().astype(np.uint8).reshape(images.shape)


def block_reduce(image: np.ndarray, side: int, how: str) -> np.ndarray:
    """(side*k, side*k) -> (side, side): the min or max of each k x k block."""
    k = image.shape[0] // side
    blocks = image.reshape(side, k, side, k)
    return blocks.min(axis=(1, 3)) if how == "min" else blocks.max(axis=(1, 3))


def dark_line_response(image: np.ndarray, sigma: float) -> np.ndarray:
    """Largest Hessian eigenvalue of a gray image at scale `sigma` px, clipped at 0, times sigma^2: high
    across a dark line (a crack, a finger, a grain boundary), 0 on flat or bright structure."""
    x = image.astype(np.float32)
    hxx = ndimage.gaussian_filter(x, sigma, order=(0, 2))
    hyy = ndimage.gaussian_filter(x, sigma, order=(2, 0))
    hxy = ndimage.gaussian_filter(x, sigma, order=(1, 1))
    largest = (hxx + hyy + np.sqrt((hxx - hyy) ** 2 + 4.0 * hxy ** 2)) / 2.0
    return np.maximum(largest, 0.0) * sigma ** 2


def source_at(raw: Path, file: str, side: int) -> np.ndarray:
    """The source image as (side, side) uint8 gray, box-resized."""
    with Image.open(raw / file) as im:
        return np.asarray(im.convert("L").resize((side, side), Image.Resampling.BOX))


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction * n_c) cells of each class c (at least one), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    keep = [rng.choice(idx, max(1, round(fraction * len(idx))), replace=False)
            for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(keep))


def fold_to_binary(labels: np.ndarray, task: dict) -> np.ndarray:
    """4-class label indices -> 0 (not one of task["defective"]) or 1 (one of them)."""
    defective = [task["classes"].index(c) for c in task["defective"]]
    return np.isin(labels, defective).astype(labels.dtype)


def build(variant: str, prepared: Path, raw: Path, out: Path, train_fraction: float = 1.0, seed: int = 0) -> None:
    """Write `out` (a prepared folder) with `variant`'s images (or labels) for the cells of `prepared`."""
    files = {int(r["sample_id"]): r["file"] for r in csv.DictReader(open(prepared / "manifest.csv"))}
    splits = {s: load_file(str(prepared / f"{s}.safetensors")) for s in SPLITS}
    side = splits["train"]["images"].shape[-1]
    extra: dict[str, np.ndarray] = {}
    if variant == "subset":
        keep = stratified_subset(splits["train"]["labels"], train_fraction, seed)
        splits["train"] = {k: v[keep] for k, v in splits["train"].items()}
    task = json.loads((prepared / TASK_FILE).read_text())
    for name, split in splits.items():
        if variant == "binary":
            split["labels"] = fold_to_binary(split["labels"], task)
        if variant in ("subset", "binary"):  # the images stay as they are
            continue
        if variant == "stretch":
            split["images"] = stretch(split["images"])
            continue
        sources = [source_at(raw, files[int(i)], side * UPSCALE) for i in split["sample_ids"]]
        if variant == "minpool":
            split["images"] = np.stack([block_reduce(s, side, "min") for s in sources])
        else:  # (N, 2, side, side) float responses, scaled below
            extra[name] = np.stack([np.stack([block_reduce(dark_line_response(s, sigma), side, "max")
                                              for sigma in (1.0, 2.0)]) for s in sources])
    if variant == "binary":
        task["classes"], task["defective"] = ["ok", "defective"], ["defective"]
    if variant == "ridge":
        scale = np.percentile(extra["train"], 99.5, axis=(0, 2, 3))[None, :, None, None]
        for name, split in splits.items():
            lines = np.clip(extra[name] / scale * 255.0, 0, 255).round().astype(np.uint8)
            split["images"] = np.concatenate([split["images"][:, None], lines], axis=1)
        task["channels"] = 3
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(prepared / "manifest.csv", out / "manifest.csv")
    (out / TASK_FILE).write_text(json.dumps(task, indent=2))
    for name, split in splits.items():
        save_file(split, str(out / f"{name}.safetensors"))
        print(f"{name}: {split['images'].shape}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=("stretch", "minpool", "ridge", "subset", "binary"), required=True)
    ap.add_argument("--train-fraction", type=float, default=1.0, help="subset: the share of train cells kept")
    ap.add_argument("--seed", type=int, default=0, help="subset: the draw")
    ap.add_argument("--prepared", type=Path, required=True, help="a prepared folder (ingest's output)")
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not 0 < args.train_fraction <= 1:
        ap.error("--train-fraction must be in (0, 1]")
    build(args.variant, args.prepared, args.raw, args.out, args.train_fraction, args.seed)


if __name__ == "__main__":
    main()
