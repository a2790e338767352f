import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lathe.config import IngestParams
from lathe.data.raw import generate_raw
from lathe.errors import DataError
from lathe.data.ingest import MANIFEST_COLUMNS, ingest, label_of, load_split, read_manifest, stratified_split, write_prepared

CFG = IngestParams(image_size=16, val_fraction=0.2, test_fraction=0.25)


@pytest.fixture()
def raw(tmp_path):
    generate_raw(tmp_path / "raw", per_class_type=6, size=32)
    return tmp_path / "raw"


def test_label_of_maps_probabilities_to_four_classes():
    assert [label_of(p) for p in (0.0, 1 / 3, 2 / 3, 1.0)] == [0, 1, 2, 3]


def test_split_is_stratified_and_seeded():
    strata = [(c, t) for c in range(4) for t in ("mono", "poly") for _ in range(8)]
    a = stratified_split(strata, 0.25, 0.25, seed=0)
    assert a == stratified_split(strata, 0.25, 0.25, seed=0)
    assert a != stratified_split(strata, 0.25, 0.25, seed=1)
    per = Counter((s, sp) for s, sp in zip(strata, a))
    for key in set(strata):
        assert (per[(key, "train")], per[(key, "val")], per[(key, "test")]) == (4, 2, 2)


def test_ingest_writes_manifest_and_arrays(raw, tmp_path):
    rows, images = ingest(raw, CFG)
    assert images.shape == (48, 16, 16) and images.dtype == np.uint8
    write_prepared(tmp_path / "prep", rows, images, CFG)
    manifest = read_manifest(tmp_path / "prep" / "manifest.csv")
    assert tuple(manifest[0]) == MANIFEST_COLUMNS and len(manifest) == 48
    total = 0
    for split in ("train", "val", "test"):
        arrays = load_split(tmp_path / "prep", split)
        ids = arrays["sample_ids"]
        assert all(manifest[i]["split"] == split for i in ids)
        np.testing.assert_array_equal(arrays["labels"], [int(manifest[i]["label"]) for i in ids])
        np.testing.assert_array_equal(arrays["images"], images[ids])
        total += len(ids)
    assert total == 48


def test_ingest_is_deterministic(raw, tmp_path):
    for name in ("a", "b"):
        rows, images = ingest(raw, CFG)
        write_prepared(tmp_path / name, rows, images, CFG)
    for f in ("manifest.csv", "train.safetensors", "val.safetensors", "test.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_unreadable_and_missing_images_are_all_named(raw):
    rows = (raw / "labels.csv").read_text().splitlines()
    broken, gone = rows[1].split(",")[0], rows[2].split(",")[0]
    (raw / broken).write_bytes(b"not a png at all")
    (raw / gone).unlink()
    with pytest.raises(DataError) as err:
        ingest(raw, CFG)
    assert broken in str(err.value) and gone in str(err.value) and "2 problem(s)" in str(err.value)


def test_truncated_png_is_named(raw):
    first = (raw / "labels.csv").read_text().splitlines()[1].split(",")[0]
    data = (raw / first).read_bytes()
    (raw / first).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=first):
        ingest(raw, CFG)


def test_paths_outside_the_raw_folder_are_refused(raw):
    (raw / "labels.csv").write_text("file,defect_probability,cell_type\n../secret.png,0.0,mono\n")
    with pytest.raises(DataError, match="outside"):
        ingest(raw, CFG)


def test_rgb_images_are_converted_to_gray(raw):
    first = (raw / "labels.csv").read_text().splitlines()[1].split(",")[0]
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 100, 50)).save(buf, format="PNG")
    (raw / first).write_bytes(buf.getvalue())
    rows, images = ingest(raw, CFG)
    assert images.shape[1:] == (16, 16) and rows[0].src_width == 32


def test_every_kind_of_bad_row_and_file_is_named_in_one_pass(raw):
    """Rows that do not parse, values outside the contract, duplicates, escapes, missing and broken
    files: one DataError, one line each naming labels.csv:<line> and the file, no second round."""
    lines = (raw / "labels.csv").read_text().splitlines()
    name = [line.split(",")[0] for line in lines]
    lines[1] = f"{name[1]},0.5,mono"  # not one of 0, 1/3, 2/3, 1
    lines[2] = f"{name[2]},0.0,polly"  # unknown cell type
    lines[3] = f"{name[3]},abc,mono"  # not a number
    (raw / name[4]).unlink()  # missing
    (raw / name[5]).write_bytes(b"\x89PNG not really")  # undecodable
    lines += [lines[6], "../outside.png,0.0,mono", f"{name[7]},,poly"]  # duplicate, escape, empty field
    (raw / "labels.csv").write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as err:
        ingest(raw, CFG)

    msg = str(err.value)
    expected = {
        2: "defect_probability 0.5 is not one of 0, 0.333333, 0.666667, 1",
        3: "cell_type 'polly' is not one of mono, poly (did you mean 'poly'?)",
        4: "defect_probability 'abc' is not a number",
        5: "file not found",
        6: "cannot decode image",
        50: "file listed again (first on line 7)",
        51: "points outside",
        52: "empty defect_probability",
    }
    body = msg.splitlines()[1:]
    assert msg.splitlines()[0].startswith("8 problem(s) in ") and len(body) == 8, msg
    for line_no, text in expected.items():
        assert any(f"labels.csv:{line_no} (" in b and text in b for b in body), (line_no, msg)


def test_a_long_list_of_problems_is_capped_with_a_count(raw):
    for path in sorted((raw / "images").iterdir())[:25]:
        path.unlink()
    with pytest.raises(DataError) as err:
        ingest(raw, CFG)
    msg = str(err.value).splitlines()
    assert msg[0].startswith("25 problem(s)") and len(msg) == 1 + 20 + 1
    assert msg[-1].strip() == "... and 5 more"
