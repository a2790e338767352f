"""A plant's own data, not ELPV: six named classes (two defective), RGB JPEGs of 3:1 aspect mixed with
16-bit gray PNGs, imported with `lathe data import-folder` from a folder per class, a `lot` group column
added to labels.csv, and the whole tiny pipeline run by `dvc repro` to signed packages that verify.

One real git + DVC workspace (tests.tiny.make_workspace), built once for the module (~2.5 minutes).
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.tiny import BIN, make_workspace, offline_env, sh, tiny_params

pytestmark = pytest.mark.slow

CLASSES = ["ok", "scratch", "dent", "stain", "crack", "burr"]  # sorted folder names give another order
DEFECTIVE = ["crack", "burr"]
PER_CLASS = 15  # images per class; lots of 3 consecutive images


def part_image(rng: np.random.Generator, k: int, sixteen_bit: bool) -> bytes:
    """A 60x20 px (3:1) part whose class shows as a band of its own height and brightness, as an RGB JPEG
    or a 16-bit gray PNG (a 12-bit camera's range, stored in 16 bits)."""
    img = rng.normal(110, 12, (20, 60)).clip(0, 255)
    img[2 + 2 * k : 5 + 2 * k] += 60 + 10 * k
    buf = io.BytesIO()
    if sixteen_bit:
        Image.fromarray((img.clip(0, 255) * 257).astype(np.uint16)).save(buf, format="PNG")
    else:
        rgb = np.stack([img, img * 0.9, img * 0.8], axis=-1).clip(0, 255).astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_folder_dataset(src: Path) -> None:
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (src / name / "line3").mkdir(parents=True)
        for i in range(PER_CLASS):
            png = i % 3 == 2
            (src / name / "line3" / f"{i:03d}.{'png' if png else 'jpg'}").write_bytes(part_image(rng, k, png))


def import_with_lots(raw: Path) -> None:
    """`lathe data import-folder` as a user runs it, then a `lot` column (3 images a lot) added to labels.csv."""
    src = raw.parent / "incoming"
    write_folder_dataset(src)
    res = subprocess.run([str(BIN / "lathe"), "data", "import-folder", str(src), str(raw)], env=offline_env(),
                         capture_output=True, text=True, check=False)
    said = res.stdout + res.stderr
    assert res.returncode == 0, said
    assert "imported 90 images of 6 classes" in said and "classes: [burr, crack, dent, ok, scratch, stain]" in said
    rows = list(csv.DictReader((raw / "labels.csv").open()))
    with (raw / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["file", "label", "lot"])
        for r in rows:
            writer.writerow([r["file"], r["label"], f"{r['label']}-{int(Path(r['file']).stem) // 3}"])
    (src / "ok" / "line3" / "000.jpg").unlink()  # the import copied: the raw data stands alone
    for p in sorted(src.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    src.rmdir()


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    params = tiny_params(
        data={"classes": CLASSES, "defective": DEFECTIVE, "channels": 3, "stratify": ["label"], "group": "lot",
              "resize": "pad"},
        quantize={"seed": 0, "calibration_size": 8},
        validate={"min_rows": 20, "min_per_class_per_split": 1, "source_min_side": 16},  # 60x20 px crops
    )
    ws = make_workspace(tmp_path_factory.mktemp("other") / "ws", params, make_raw=import_with_lots)
    res = sh(ws, "dvc", "repro", check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return ws


def test_every_lot_is_in_one_split_and_every_split_has_every_class(ws):
    manifest = list(csv.DictReader((ws / "data/prepared/manifest.csv").open()))
    assert len(manifest) == 90 and {r["label"] for r in manifest} == set(CLASSES)
    lots: dict[str, set[str]] = {}
    for r in manifest:
        lots.setdefault(r["lot"], set()).add(r["split"])
    assert len(lots) == 30 and all(len(s) == 1 for s in lots.values()), lots
    for split in ("train", "val", "test"):
        assert {r["label"] for r in manifest if r["split"] == split} == set(CLASSES), split
    depths = {(r["src_mode"], r["src_bit_depth"]) for r in manifest}
    assert depths == {("RGB", "8"), ("I;16", "16")}, depths
    assert {(r["src_width"], r["src_height"]) for r in manifest} == {("60", "20")}
    result = json.loads((ws / "data/validation/result.json").read_text())
    assert result["success"] and "group_in_one_split" in [e["name"] for e in result["expectations"]]


def test_the_models_take_three_channels_and_predict_the_six_named_classes(ws):
    task = json.loads((ws / "data/prepared/task.json").read_text())
    assert task["classes"] == CLASSES and task["channels"] == 3 and task["resize"] == "pad"
    arch = json.loads((ws / "models/teacher/arch.json").read_text())
    assert (arch["spec"]["in_channels"], arch["spec"]["num_classes"]) == (3, 6)
    detail = json.loads((ws / "reports/quantized/student/detail.json").read_text())
    assert {f"recall_{c}" for c in CLASSES} <= set(detail["metrics"])


def test_the_signed_package_says_how_to_feed_the_model_and_verifies(ws):
    pkg = ws / "models/packages/tiny-gw"
    pre = json.loads((pkg / "preprocessing.json").read_text())
    assert pre["class_names"] == CLASSES and pre["defective_classes"] == DEFECTIVE
    assert pre["input"]["shape"][1] == 3 and pre["source_image"]["channels"] == 3 and pre["resize"]["policy"] == "pad"
    assert "[4, 5]" in pre["decision"]["p_defective"]
    card = (pkg / "model_card.md").read_text()
    assert "| crack (defective) |" in card and "| ok |" in card
    res = subprocess.run([str(BIN / "lathe"), "verify", "models/packages/tiny-gw"], cwd=ws, env=offline_env(),
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
