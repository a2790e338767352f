import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lathe.data.contract import DataParams, read_task
from lathe.data.ingest import (
    MANIFEST_COLUMNS,
    grouped_split,
    ingest,
    load_split,
    read_manifest,
    stratified_split,
    write_prepared,
)
from lathe.data.params import IngestParams
from lathe.data.raw import ELPV_CLASSES, generate_raw
from lathe.errors import DataError

CFG = IngestParams(image_size=16, val_fraction=0.2, test_fraction=0.25)
ELPV = DataParams(classes=list(ELPV_CLASSES), defective=list(ELPV_CLASSES[2:]), stratify=["label", "cell_type"])


@pytest.fixture()
def raw(tmp_path):
    generate_raw(tmp_path / "raw", per_class_type=6, size=32)
    return tmp_path / "raw"


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_split_is_stratified_and_seeded():
    strata = [(c, t) for c in range(4) for t in ("mono", "poly") for _ in range(8)]
    a = stratified_split(strata, 0.25, 0.25, seed=0)
    assert a == stratified_split(strata, 0.25, 0.25, seed=0)
    assert a != stratified_split(strata, 0.25, 0.25, seed=1)
    per = Counter((s, sp) for s, sp in zip(strata, a))
    for key in set(strata):
        assert (per[(key, "train")], per[(key, "val")], per[(key, "test")]) == (4, 2, 2)


def test_grouped_split_keeps_every_group_in_one_split_and_fills_all_three():
    strata = [(c,) for c in range(2) for _ in range(40)]
    groups = [f"module{i // 4}" for i in range(80)]  # 20 modules of 4 cells, each one class
    splits = grouped_split(strata, groups, 0.2, 0.25, seed=0, column="module")
    by_group = {}
    for g, s in zip(groups, splits):
        by_group.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())
    sizes = Counter(splits)
    assert set(sizes) == {"train", "val", "test"} and 12 <= sizes["test"] <= 28 and sizes["val"] >= 4


def test_a_group_column_that_cannot_fill_three_splits_is_a_data_error():
    with pytest.raises(DataError, match="data.group 'wafer': 2 group\\(s\\) cannot fill"):
        grouped_split([(0,)] * 10, ["w1"] * 5 + ["w2"] * 5, 0.2, 0.25, seed=0, column="wafer")


def test_ingest_writes_task_manifest_and_arrays(raw, tmp_path):
    rows, images, task = ingest(raw, CFG, ELPV)
    assert images.shape == (48, 16, 16) and images.dtype == np.uint8
    write_prepared(tmp_path / "prep", rows, images, task)
    manifest = read_manifest(tmp_path / "prep" / "manifest.csv")
    assert tuple(manifest[0]) == (*MANIFEST_COLUMNS, "defect_probability", "cell_type") and len(manifest) == 48
    assert read_task(tmp_path / "prep") == task and task.defective_indices == [2, 3] and task.channels == 1
    assert {m["label"] for m in manifest} == set(ELPV_CLASSES) and manifest[0]["src_bit_depth"] == "8"
    total = 0
    for split in ("train", "val", "test"):
        arrays = load_split(tmp_path / "prep", split)
        assert set(arrays) == {"images", "labels", "sample_ids"}
        ids = arrays["sample_ids"]
        assert all(manifest[i]["split"] == split for i in ids)
        np.testing.assert_array_equal(arrays["labels"], [int(manifest[i]["label_index"]) for i in ids])
        np.testing.assert_array_equal(arrays["images"], images[ids])
        total += len(ids)
    assert total == 48


def test_ingest_is_deterministic(raw, tmp_path):
    for name in ("a", "b"):
        rows, images, task = ingest(raw, CFG, ELPV)
        write_prepared(tmp_path / name, rows, images, task)
    for f in ("manifest.csv", "task.json", "train.safetensors", "val.safetensors", "test.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_rgb_3_to_1_aspect_jpegs_with_a_group_make_three_channel_padded_inputs(tmp_path):
    """Six classes, two defective, RGB JPEGs of 3:1 aspect, a `lot` group column: (N, 3, S, S) arrays,
    the padding black above and below, and no lot in two splits."""
    classes = ["ok", "scratch", "dent", "stain", "crack", "burr"]
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    (raw / "img").mkdir(parents=True)
    lines = ["file,label,lot"]
    for i in range(72):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(60, 200, (20, 60, 3), dtype=np.uint8), "RGB").save(buf, format="JPEG")
        (raw / "img" / f"{i}.jpg").write_bytes(buf.getvalue())
        lines.append(f"img/{i}.jpg,{classes[i % 6]},lot{i // 3}")
    (raw / "labels.csv").write_text("\n".join(lines) + "\n")
    data = DataParams(classes=classes, defective=["crack", "burr"], channels=3, group="lot", resize="pad")
    rows, images, task = ingest(raw, CFG, data)
    assert images.shape == (72, 3, 16, 16) and task.defective_indices == [4, 5] and task.group == "lot"
    assert images[:, :, :5].max() == 0 and images[:, :, 11:].max() == 0 and images[:, :, 6:10].min() > 0
    lots = {}
    for r in rows:
        lots.setdefault(r.values["lot"], set()).add(r.split)
    assert all(len(s) == 1 for s in lots.values()) and {r.split for r in rows} == {"train", "val", "test"}


def test_16_bit_sources_are_scaled_by_their_depth_not_clipped(tmp_path):
    raw = tmp_path / "raw"
    (raw / "img").mkdir(parents=True)
    lines = ["file,label"]
    for i in range(12):
        level = 1023 if i % 2 else 65535  # a 10-bit camera's full scale, and a true 16-bit one
        (raw / "img" / f"{i}.png").write_bytes(png(np.full((32, 32), level, np.uint16)))
        lines.append(f"img/{i}.png,{'good' if i % 2 else 'bad'}")
    (raw / "labels.csv").write_text("\n".join(lines) + "\n")
    rows, images, _ = ingest(raw, CFG, DataParams(classes=["good", "bad"], defective=["bad"]))
    assert {r.values["src_bit_depth"] for r in rows} == {16}
    assert sorted({int(images[i].max()) for i in range(12)}) == [4, 255]  # 1023 * 255 / 65535 = 4, not 255


def test_unreadable_and_missing_images_are_all_named(raw):
    rows = (raw / "labels.csv").read_text().splitlines()
    broken, gone = rows[1].split(",")[0], rows[2].split(",")[0]
    (raw / broken).write_bytes(b"not a png at all")
    (raw / gone).unlink()
    with pytest.raises(DataError) as err:
        ingest(raw, CFG, ELPV)
    assert broken in str(err.value) and gone in str(err.value) and "2 problem(s)" in str(err.value)


def test_truncated_png_is_named(raw):
    first = (raw / "labels.csv").read_text().splitlines()[1].split(",")[0]
    data = (raw / first).read_bytes()
    (raw / first).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=first):
        ingest(raw, CFG, ELPV)


def test_paths_outside_the_raw_folder_are_refused(raw):
    (raw / "labels.csv").write_text("file,label,cell_type\n../secret.png,functional,mono\n")
    with pytest.raises(DataError, match="outside"):
        ingest(raw, CFG, ELPV)


def test_rgb_images_are_converted_to_gray(raw):
    first = (raw / "labels.csv").read_text().splitlines()[1].split(",")[0]
    (raw / first).write_bytes(png(np.full((32, 32, 3), (200, 100, 50), np.uint8)))
    rows, images, _ = ingest(raw, CFG, ELPV)
    assert images.shape[1:] == (16, 16) and rows[0].values["src_width"] == 32 and rows[0].values["src_mode"] == "RGB"


def test_a_metadata_column_the_params_name_must_exist(raw):
    with pytest.raises(DataError, match="no column\\(s\\) lot, which params data.stratify/data.group name"):
        ingest(raw, CFG, ELPV.model_copy(update={"group": "lot"}))


def test_every_kind_of_bad_row_and_file_is_named_in_one_pass(raw):
    """Labels outside the classes, a label that looks like a huge number, empty stratify values,
    duplicates, escapes, missing and broken files: one DataError, one line each naming labels.csv:<line>
    and the file, no second round."""
    lines = (raw / "labels.csv").read_text().splitlines()
    name = [line.split(",")[0] for line in lines]
    lines[1] = f"{name[1]},defectve,0,mono"  # misspelt class
    lines[2] = f"{name[2]},1e308,1,poly"  # not a class (a number where a name belongs)
    lines[3] = f"{name[3]},functional,0,"  # empty cell_type, which data.stratify uses
    (raw / name[4]).unlink()  # missing
    (raw / name[5]).write_bytes(b"\x89PNG not really")  # undecodable
    lines += [lines[6], "../outside.png,functional,0,mono"]  # duplicate, escape
    (raw / "labels.csv").write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as err:
        ingest(raw, CFG, ELPV)

    msg = str(err.value)
    expected = {
        2: "label 'defectve' is not one of data.classes (functional, possibly_defective, probably_defective, "
           "defective); did you mean 'defective'?",
        3: "label '1e308' is not one of data.classes",
        4: "empty cell_type",
        5: "file not found",
        6: "cannot decode image",
        50: "file listed again (first on line 7)",
        51: "points outside",
    }
    body = msg.splitlines()[1:]
    assert msg.splitlines()[0].startswith("7 problem(s) in ") and len(body) == 7, msg
    for line_no, text in expected.items():
        assert any(f"labels.csv:{line_no} (" in b and text in b for b in body), (line_no, msg)


def test_a_long_list_of_problems_is_capped_with_a_count(raw):
    for path in sorted((raw / "images").iterdir())[:25]:
        path.unlink()
    with pytest.raises(DataError) as err:
        ingest(raw, CFG, ELPV)
    msg = str(err.value).splitlines()
    assert msg[0].startswith("25 problem(s)") and len(msg) == 1 + 20 + 1
    assert msg[-1].strip() == "... and 5 more"


def test_task_json_is_plain_and_names_the_contract(raw, tmp_path):
    rows, images, task = ingest(raw, CFG, ELPV)
    write_prepared(tmp_path / "prep", rows, images, task)
    record = json.loads((tmp_path / "prep" / "task.json").read_text())
    assert record["classes"] == list(ELPV_CLASSES) and record["defective"] == ["probably_defective", "defective"]
    assert record["metadata"] == ["defect_probability", "cell_type"] and record["kind"] == "image_classification"


def test_a_hand_edited_task_file_is_one_line_naming_it(raw, tmp_path):
    rows, images, task = ingest(raw, CFG, ELPV)
    write_prepared(tmp_path / "prep", rows, images, task)
    record = json.loads((tmp_path / "prep" / "task.json").read_text())
    (tmp_path / "prep" / "task.json").write_text(json.dumps({**record, "defective": ["cracked"]}))
    with pytest.raises(DataError, match=r"task.json: not a valid task file \(.*defective \['cracked'\]"):
        read_task(tmp_path / "prep")
    (tmp_path / "prep" / "task.json").write_text("{")
    with pytest.raises(DataError, match="task.json: not a valid task file"):
        read_task(tmp_path / "prep")
