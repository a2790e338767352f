import pytest

from lathe.data.raw import ELPV_CLASSES, RawSample, generate_raw, import_elpv, read_labels, write_labels
from lathe.errors import DataError
from lathe.io import sha256_file


def test_generate_raw_is_deterministic_and_writes_the_contract(tmp_path):
    n = generate_raw(tmp_path / "a", per_class_type=2, size=32)
    generate_raw(tmp_path / "b", per_class_type=2, size=32)
    assert n == 16
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 17  # 16 images + labels.csv
    for f in files:
        assert sha256_file(tmp_path / "a" / f) == sha256_file(tmp_path / "b" / f)
    assert (tmp_path / "a" / "labels.csv").read_text().splitlines()[0] == "file,label,defect_probability,cell_type"
    labels = read_labels(tmp_path / "a")
    assert {s.label for s in labels} == set(ELPV_CLASSES)
    assert {s.meta["cell_type"] for s in labels} == {"mono", "poly"}


def test_generated_defects_grow_with_the_class_but_neighbouring_classes_overlap():
    """Learnable (the dark area grows with the grade) but noisy (some grade-1 cells look like grade 0, grades
    2 and 3 overlap, and brightness separates none); the tiny pipeline's teacher learning them is
    tests/integration/test_pipeline.py."""
    import numpy as np

    from lathe.data.raw import synth_image

    rng = np.random.default_rng(0)
    dark, mean = {}, {}
    for k in range(4):
        images = [synth_image(rng, 32, k, ct).astype(float) for ct in ("mono", "poly") for _ in range(40)]
        dark[k] = np.array([(im < 0.6 * np.median(im)).mean() for im in images])  # busbars alone: 0.125
        mean[k] = np.array([im.mean() for im in images])
    assert dark[0].mean() < dark[1].mean() < dark[2].mean() < dark[3].mean()
    assert dark[3].mean() - dark[0].mean() > 0.1
    assert dark[1].min() <= dark[0].max() and dark[2].max() > dark[3].min()
    assert all(mean[k].max() > mean[k + 1].min() for k in range(3))


def test_generation_is_fast(tmp_path):
    import time

    start = time.perf_counter()
    assert generate_raw(tmp_path / "raw", per_class_type=12, size=32) == 96  # the tiny pipeline's raw data
    assert time.perf_counter() - start < 10  # ~0.3 s here


@pytest.mark.parametrize(
    "row, expected",
    [
        ("images/x.png,,mono", "empty label"),
        (",ok,mono", "empty file name"),
        ("images/x.png,ok,mono,extra", "4 cells, but the header has 3"),
    ],
)
def test_bad_label_rows_name_the_line_and_file(tmp_path, row, expected):
    (tmp_path / "labels.csv").write_text(f"file,label,cell_type\nimages/ok.png,ok,mono\n{row}\n")
    with pytest.raises(DataError) as err:
        read_labels(tmp_path)
    assert expected in str(err.value) and "labels.csv:3" in str(err.value)


def test_missing_columns_and_missing_file_are_reported(tmp_path):
    with pytest.raises(DataError, match="labels file not found"):
        read_labels(tmp_path)
    (tmp_path / "labels.csv").write_text("file,prob\nimages/x.png,0\n")
    with pytest.raises(DataError, match="missing column.*label"):
        read_labels(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label,lot,lot\nimages/x.png,a,1,2\n")
    with pytest.raises(DataError, match="distinct"):
        read_labels(tmp_path)


def test_a_bom_at_the_start_of_labels_csv_is_accepted(tmp_path):
    """Excel writes UTF-8 CSV with a byte-order mark; it must not become part of the first column's name."""
    (tmp_path / "labels.csv").write_bytes("\ufefffile,label,lot\nimages/a.png,scratch,L1\n".encode())
    [sample] = read_labels(tmp_path)
    assert (sample.file, sample.label, sample.meta) == ("images/a.png", "scratch", {"lot": "L1"})


def test_non_utf8_and_oversized_labels_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "labels.csv").write_bytes(b"file,label\nimages/\xff.png,a\n")
    with pytest.raises(DataError, match="labels.csv: not UTF-8"):
        read_labels(tmp_path)
    import lathe.data.raw as raw

    monkeypatch.setattr(raw, "MAX_LABELS_BYTES", 10)
    with pytest.raises(DataError, match="labels.csv: .* bytes, more than"):
        read_labels(tmp_path)


def test_labels_round_trip_keeps_metadata_spelling(tmp_path):
    write_labels(tmp_path, [RawSample("images/a.png", "defective", {"defect_probability": "0.3333333333333333"})],
                 ["defect_probability"])
    assert (tmp_path / "labels.csv").read_text().splitlines() == ["file,label,defect_probability",
                                                                  "images/a.png,defective,0.3333333333333333"]
    assert read_labels(tmp_path)[0].meta == {"defect_probability": "0.3333333333333333"}


def test_import_elpv_copies_bytes_and_names_the_grades(tmp_path):
    src = tmp_path / "pkg"
    generate_raw(tmp_path / "gen", per_class_type=1, size=32)
    (src / "images").mkdir(parents=True)
    lines = []
    for s in read_labels(tmp_path / "gen"):
        (src / s.file).write_bytes((tmp_path / "gen" / s.file).read_bytes())
        lines.append(f"{s.file}  {s.meta['defect_probability']}   {s.meta['cell_type']}")
    (src / "labels.csv").write_text("\n".join(lines) + "\n")
    n = import_elpv(tmp_path / "raw", source=src)
    assert n == 8
    samples = read_labels(tmp_path / "raw")
    assert [s.file for s in samples] == [s.file for s in read_labels(tmp_path / "gen")]
    assert [s.label for s in samples] == [s.label for s in read_labels(tmp_path / "gen")]
    assert samples[2].meta == {"defect_probability": "0.3333333333333333", "cell_type": "mono"}
    assert samples[2].label == "possibly_defective"
    assert sha256_file(tmp_path / "raw" / samples[0].file) == sha256_file(src / samples[0].file)


def test_import_elpv_names_a_missing_image_and_an_unknown_probability(tmp_path):
    src = tmp_path / "pkg"
    src.mkdir()
    (src / "labels.csv").write_text("images/gone.png  1.0  mono\n")
    with pytest.raises(DataError, match="gone.png"):
        import_elpv(tmp_path / "raw", source=src)
    (src / "labels.csv").write_text("images/a.png  0.5  mono\n")
    with pytest.raises(DataError, match="labels.csv:1: defect probability '0.5'"):
        import_elpv(tmp_path / "raw2", source=src)
