"""The data gate on tiny real data: a clean dataset passes; each kind of bad input fails naming its file.

Great Expectations is real (no mocks); it is imported once per session (~5 s), then each
validation takes well under a second.
"""

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from lathe.data.contract import DataParams
from lathe.data.ingest import ingest, read_manifest, write_prepared
from lathe.data.params import IngestParams, ValidateParams
from lathe.data.raw import generate_raw
from lathe.data.validate import validate_prepared
from lathe.data.validate_report import (
    MAX_OFFENDERS,
    RESULT_FILE,
    SUMMARY_FILE,
    raise_if_failed,
    write_report,
)
from lathe.errors import DataError, ValidationFailed
from lathe.io import load_arrays, save_arrays
from tests.tiny import TINY_PARAMS

INGEST = IngestParams(**TINY_PARAMS["ingest"])
DATA = DataParams(**TINY_PARAMS["data"])
CFG = ValidateParams(**TINY_PARAMS["validate"])
SIZE = INGEST.image_size


def prepare(raw, prep):
    rows, images, task = ingest(raw, INGEST, DATA)
    write_prepared(prep, rows, images, task)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """48 generated samples (4 classes x 2 types x 6), 32 px sources, ingested at 16 px."""
    root = tmp_path_factory.mktemp("clean")
    generate_raw(root / "raw", per_class_type=6, size=32)
    prepare(root / "raw", root / "prep")
    return root


@pytest.fixture()
def work(clean, tmp_path):
    """A private copy of the clean raw and prepared folders, to break."""
    shutil.copytree(clean / "raw", tmp_path / "raw")
    shutil.copytree(clean / "prep", tmp_path / "prep")
    return tmp_path


def run(root, cfg=CFG, size=SIZE):
    return validate_prepared(root / "prep", root / "raw", cfg, size)


def failed_names(report):
    return {o.name for o in report.failed}


def gate_message(report):
    with pytest.raises(ValidationFailed) as exc:
        raise_if_failed(report)
    return str(exc.value)


def manifest_rows(root):
    return read_manifest(root / "prep" / "manifest.csv")


def rewrite_csv(path, transform):
    """Rewrite a CSV through `transform(list of row dicts) -> list of row dicts`."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames), list(reader)
    rows = transform(rows)
    fields = [f for f in fields if f in rows[0]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue())


def set_manifest_field(root, file, **changes):
    """Change one row of the prepared manifest.csv, e.g. cell_type='cigs'."""
    def edit(rows):
        for r in rows:
            if r["file"] == file:
                r.update(changes)
        return rows
    rewrite_csv(root / "prep" / "manifest.csv", edit)


def png(pixels):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Clean data


def test_clean_data_passes_every_expectation(clean):
    report = run(clean)
    assert report.success, gate_message(report)
    raise_if_failed(report)  # no exception
    names = [o.name for o in report.expectations]
    assert len(names) == len(set(names)) >= 30
    assert {"sha256_unique", "class_count_per_split", "images_shape", "arrays_split_match",
            "raw_sha256_match", "label_in_set", "label_index_in_set", "cell_type_not_null"} <= set(names)
    st = report.statistics
    assert st["rows"] == 48 and st["image_size"] == SIZE
    assert sum(sum(per.values()) for per in st["split_class_counts"].values()) == 48
    assert all(o.expectation.startswith("expect_") for o in report.expectations)


def test_reports_are_strict_json_and_byte_identical_across_runs(clean, tmp_path):
    write_report(run(clean), tmp_path / "a")
    write_report(run(clean), tmp_path / "b")
    for name in (RESULT_FILE, SUMMARY_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    result = json.loads((tmp_path / "a" / RESULT_FILE).read_text())
    assert result["success"] is True and result["failed"] == []
    first = result["expectations"][0]
    keys = {"name", "success", "observed", "offenders", "offender_count", "kwargs", "expectation"}
    assert keys <= set(first)
    assert "# Data validation: PASSED" in (tmp_path / "a" / SUMMARY_FILE).read_text()


# ----------------------------------------------------------------------------------------------
# Bad labels and images (broken in raw, then ingested as usual)


def test_label_index_outside_the_classes_fails_naming_the_file(work):
    victim = manifest_rows(work)[0]["file"]
    # ingest never writes such a row (tests/lathe/data/test_ingest.py); the gate still catches a prepared
    # folder written otherwise (an older ingest, a hand edit)
    set_manifest_field(work, victim, label_index="9")
    report = run(work)
    # the arrays still say the old index, so the cross-check fails too
    assert failed_names(report) == {"label_index_in_set", "arrays_label_match"}
    msg = gate_message(report)
    assert victim in msg and "9" in msg


def test_label_outside_the_classes_fails_naming_the_file(work):
    def relabel(rows):
        rows[3]["label"] = "cracked"
        return rows
    victim = manifest_rows(work)[3]["file"]
    rewrite_csv(work / "prep" / "manifest.csv", relabel)
    report = run(work)
    assert failed_names(report) == {"label_in_set"}
    assert f"{victim} (cracked)" in gate_message(report)


def test_an_empty_stratify_column_fails_naming_the_file(work):
    victim = manifest_rows(work)[5]["file"]
    set_manifest_field(work, victim, cell_type="")  # ingest refuses it in labels.csv
    report = run(work)
    assert failed_names(report) == {"cell_type_not_null"}
    assert victim in gate_message(report)


def test_a_group_value_in_two_splits_fails_naming_the_group(work):
    task = json.loads((work / "prep" / "task.json").read_text())
    (work / "prep" / "task.json").write_text(json.dumps({**task, "group": "cell_type"}))  # mono is in every split
    report = run(work)
    assert failed_names(report) == {"group_in_one_split"}
    assert "cell_type mono (test,train,val)" in gate_message(report)


def test_duplicate_image_in_two_splits_names_both_files(work):
    rows = manifest_rows(work)
    a = next(r for r in rows if r["split"] == "train" and r["label"] == "functional")
    b = next(r for r in rows if r["split"] == "test" and r["label"] == "defective")
    (work / "raw" / b["file"]).write_bytes((work / "raw" / a["file"]).read_bytes())
    prepare(work / "raw", work / "prep")
    # splits depend on labels.csv only, so b stays in test, labelled defective
    assert [r["split"] for r in manifest_rows(work)] == [r["split"] for r in rows]
    report = run(work)
    assert failed_names(report) == {"sha256_unique"}
    (dup,) = report.failed
    assert dup.offender_count == 2 and {o.where for o in dup.offenders} == {a["file"], b["file"]}
    msg = gate_message(report)
    assert a["file"] in msg and b["file"] in msg
    assert "different splits (test, train)" in msg and "different labels (defective, functional)" in msg


def test_blank_image_fails_pixel_std(work):
    victim = manifest_rows(work)[7]["file"]
    (work / "raw" / victim).write_bytes(png(np.full((32, 32), 128)))
    prepare(work / "raw", work / "prep")
    report = run(work)
    assert failed_names(report) == {"pixel_std_min"}
    assert f"{victim} (0)" in gate_message(report)


def test_too_small_source_image_fails_min_side(work):
    victim = manifest_rows(work)[9]["file"]
    noise = np.random.default_rng(0).integers(60, 200, (16, 20))
    (work / "raw" / victim).write_bytes(png(noise))
    prepare(work / "raw", work / "prep")
    report = run(work)
    assert failed_names(report) == {"src_width_min", "src_height_min"}
    msg = gate_message(report)
    assert f"{victim} (20)" in msg and f"{victim} (16)" in msg


def test_split_without_a_class_fails_naming_split_and_class(work):
    # keep one defective image per cell type: strata of 1 all land in train, none in val or test
    def drop(rows):
        return [r for r in rows if r["label"] != "defective" or r["file"].endswith("_000.png")]
    rewrite_csv(work / "raw" / "labels.csv", drop)
    shutil.rmtree(work / "prep")
    prepare(work / "raw", work / "prep")
    report = run(work)
    assert failed_names(report) == {"class_count_per_split"}
    (counts,) = report.failed
    assert [o.where for o in counts.offenders] == ["split val, class defective", "split test, class defective"]
    assert "split val, class defective (0)" in gate_message(report)


def test_min_per_class_per_split_comes_from_params(clean):
    report = run(clean, cfg=CFG.model_copy(update={"min_per_class_per_split": 3}))
    assert failed_names(report) == {"class_count_per_split"}
    assert {o.where for o in report.failed[0].offenders} == {f"split val, class {c}" for c in DATA.classes}


# ----------------------------------------------------------------------------------------------
# Raw files changed after ingest


def test_raw_file_modified_after_ingest_fails_sha256(work):
    victim = manifest_rows(work)[11]["file"]
    with open(work / "raw" / victim, "ab") as fh:
        fh.write(b"tampered")  # still a decodable PNG; only the hash tells
    report = run(work)
    assert failed_names(report) == {"raw_sha256_match"}
    assert victim in gate_message(report)


def test_missing_raw_file_fails_naming_it(work):
    victim = manifest_rows(work)[13]["file"]
    (work / "raw" / victim).unlink()
    report = run(work)
    assert failed_names(report) == {"raw_files_exist"}  # no second, hash-mismatch report for it
    assert f"{victim} (missing)" in gate_message(report)


# ----------------------------------------------------------------------------------------------
# Prepared arrays and manifest damaged


def test_array_labels_disagreeing_with_manifest_fail(work):
    arrays = load_arrays(work / "prep" / "train.safetensors")
    sid = int(arrays["sample_ids"][0])
    arrays["labels"][0] = (arrays["labels"][0] + 1) % len(DATA.classes)
    save_arrays(work / "prep" / "train.safetensors", arrays, {"image_size": str(SIZE)})
    report = run(work)
    assert failed_names(report) == {"arrays_label_match"}
    (bad,) = report.failed
    assert bad.offenders[0].sample_id == sid
    assert manifest_rows(work)[sid]["file"] in gate_message(report)


def test_an_image_size_other_than_the_params_is_a_data_error_naming_the_task(clean):
    with pytest.raises(DataError, match="task.json: image size 16, but params ingest.image_size is 32"):
        run(clean, size=SIZE * 2)


def test_wrong_image_size_fails_naming_every_split_file(work):
    task = json.loads((work / "prep" / "task.json").read_text())
    (work / "prep" / "task.json").write_text(json.dumps({**task, "image_size": SIZE * 2}))
    report = run(work, size=SIZE * 2)
    assert failed_names(report) == {"images_shape", "image_size_metadata"}
    msg = gate_message(report)
    assert all(f"{s}.safetensors ({SIZE}x{SIZE})" in msg for s in ("train", "val", "test"))


def test_missing_split_file_fails_and_its_samples_are_reported(work):
    (work / "prep" / "val.safetensors").unlink()
    report = run(work)
    assert failed_names(report) == {"split_files_readable", "split_sizes_sum", "arrays_split_match"}
    msg = gate_message(report)
    assert "val.safetensors (missing)" in msg
    val_files = [r["file"] for r in manifest_rows(work) if r["split"] == "val"]
    assert val_files[0] in msg


def test_empty_manifest_cell_fails_not_null(work):
    def blank(rows):
        rows[2]["pixel_std"] = ""
        return rows
    rewrite_csv(work / "prep" / "manifest.csv", blank)
    report = run(work)
    assert failed_names(report) == {"pixel_std_not_null"}
    assert manifest_rows(work)[2]["file"] in gate_message(report)


def test_missing_manifest_column_is_reported_once_without_errors(work):
    def drop(rows):
        return [{k: v for k, v in r.items() if k != "pixel_mean"} for r in rows]
    rewrite_csv(work / "prep" / "manifest.csv", drop)
    report = run(work)
    assert failed_names(report) == {"manifest_columns"}
    assert all(o.error is None for o in report.expectations)
    assert "pixel_mean" in gate_message(report)


def test_offender_lists_are_capped_but_counts_exact(clean, tmp_path):
    report = run(clean, cfg=CFG.model_copy(update={"pixel_std_min": 1000.0}))
    (std,) = report.failed
    assert std.offender_count == 48 and len(std.offenders) == MAX_OFFENDERS
    assert "and 38 more" in gate_message(report)
    write_report(report, tmp_path)
    result = json.loads((tmp_path / RESULT_FILE).read_text())
    assert result["success"] is False and result["failed"] == ["pixel_std_min"]
    summary = (tmp_path / SUMMARY_FILE).read_text()
    assert "# Data validation: FAILED" in summary and "**FAIL**" in summary


def test_missing_manifest_is_a_data_error(tmp_path):
    (tmp_path / "task.json").write_text(json.dumps({"classes": ["a", "b"], "defective": ["b"], "image_size": SIZE}))
    with pytest.raises(DataError, match="manifest.csv"):
        validate_prepared(tmp_path, tmp_path, CFG, SIZE)
