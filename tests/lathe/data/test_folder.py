import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lathe.data.folder import classes_of, import_folder, scan_folder
from lathe.errors import DataError


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 5), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture()
def src(tmp_path):
    """3 classes: `ok` (nested sub-folder, upper-case extension, a comma in a name), `crack` (a non-image
    file, a hidden file and a hidden folder) and `dark spot` (a space in the class name)."""
    root = tmp_path / "src"
    put(root / "ok" / "b.png", png(1))
    put(root / "ok" / "line 2" / "a,1.PNG", png(2))
    put(root / "ok" / "a.jpg", png(3))  # any bytes: the import does not decode
    put(root / "crack" / "c1.tif", png(4))
    put(root / "crack" / "notes.txt", b"not an image")
    put(root / "crack" / ".DS_Store", b"hidden")
    put(root / "crack" / ".cache" / "x.png", png(5))
    put(root / "dark spot" / "d.bmp", png(6))
    put(root / "README.md", b"beside the classes")
    return root


EXPECTED_LABELS = (
    "file,label\n"
    "images/crack/c1.tif,crack\n"
    "images/dark spot/d.bmp,dark spot\n"
    "images/ok/a.jpg,ok\n"
    "images/ok/b.png,ok\n"
    '"images/ok/line 2/a,1.PNG",ok\n'
)


def test_import_writes_the_expected_labels_and_copies(src, tmp_path):
    dest = tmp_path / "raw"

    counts = import_folder(src, dest)

    assert counts == {"crack": 1, "dark spot": 1, "ok": 3}
    assert list(counts) == ["crack", "dark spot", "ok"]
    assert (dest / "labels.csv").read_text() == EXPECTED_LABELS
    copied = dest / "images" / "ok" / "line 2" / "a,1.PNG"
    assert not copied.is_symlink() and copied.read_bytes() == (src / "ok" / "line 2" / "a,1.PNG").read_bytes()
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["images/crack/c1.tif", "images/dark spot/d.bmp", "images/ok/a.jpg", "images/ok/b.png",
                     "images/ok/line 2/a,1.PNG", "labels.csv"]


def test_scan_counts_skipped_files_and_classes_of_lists_the_classes(src):
    scan = scan_folder(src)

    assert scan.skipped == ["README.md", "crack/notes.txt"]
    assert scan.images == {"crack": ["c1.tif"], "dark spot": ["d.bmp"], "ok": ["a.jpg", "b.png", "line 2/a,1.PNG"]}
    assert classes_of(src) == ["crack", "dark spot", "ok"]


def test_link_mode_makes_absolute_symlinks(src, tmp_path):
    dest = tmp_path / "raw"

    import_folder(src, dest, mode="link")

    link = dest / "images" / "crack" / "c1.tif"
    assert link.is_symlink()
    target = Path(os.readlink(link))
    assert target.is_absolute() and target == (src / "crack" / "c1.tif").resolve()
    assert (dest / "labels.csv").read_text() == EXPECTED_LABELS


def test_import_is_deterministic(src, tmp_path):
    import_folder(src, tmp_path / "one")
    import_folder(src, tmp_path / "two")

    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "labels.csv").read_bytes() == (two / "labels.csv").read_bytes()
    for path in one.rglob("*"):
        if path.is_file():
            assert (two / path.relative_to(one)).read_bytes() == path.read_bytes()


def test_refuses_a_source_that_is_not_a_folder(tmp_path):
    missing = tmp_path / "nowhere"

    with pytest.raises(DataError, match=f"^{re.escape(str(missing))}: not a folder"):
        import_folder(missing, tmp_path / "raw")


def test_refuses_a_source_without_class_folders(tmp_path):
    flat = tmp_path / "flat"
    put(flat / "a.png", png(1))
    (flat / ".hidden").mkdir()

    with pytest.raises(DataError, match=f"^{re.escape(str(flat))}: no class sub-folders"):
        import_folder(flat, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_refuses_a_class_without_images(src, tmp_path):
    put(src / "empty" / "notes.txt", b"")

    with pytest.raises(DataError, match=f"^{re.escape(str(src / 'empty'))}: no images"):
        import_folder(src, tmp_path / "raw")
    assert not (tmp_path / "raw" / "labels.csv").exists()


def test_never_overwrites_a_dataset(src, tmp_path):
    dest = tmp_path / "raw"
    labels = put(dest / "labels.csv", b"file,label\nimages/x.png,ok\n")

    with pytest.raises(DataError, match=f"^{re.escape(str(labels))}: already exists"):
        import_folder(src, dest)
    assert labels.read_bytes() == b"file,label\nimages/x.png,ok\n"
    assert not (dest / "images").exists()


@pytest.mark.parametrize("name", ["-leading-dash", "semi;colon", "x" * 101, "sp\u00e9cial"])
def test_refuses_an_unusable_class_name(src, tmp_path, name):
    put(src / name / "a.png", png(1))

    with pytest.raises(DataError, match="is not a usable class name") as err:
        import_folder(src, tmp_path / "raw")
    assert str(err.value).startswith(f"{src / name}: ")


def test_refuses_a_symlinked_file_pointing_outside(src, tmp_path):
    outside = put(tmp_path / "elsewhere" / "secret.png", png(9))
    link = src / "ok" / "sneaky.png"
    link.symlink_to(outside)

    with pytest.raises(DataError, match="symlink points outside") as err:
        import_folder(src, tmp_path / "raw")
    assert str(err.value).startswith(f"{link}: ")


def test_refuses_a_symlinked_folder_pointing_outside(src, tmp_path):
    put(tmp_path / "elsewhere" / "more" / "x.png", png(9))
    link = src / "ok" / "more"
    link.symlink_to(tmp_path / "elsewhere" / "more")

    with pytest.raises(DataError, match=f"^{re.escape(str(link))}: symlink points outside"):
        import_folder(src, tmp_path / "raw")


def test_a_symlink_inside_the_source_is_imported(src, tmp_path):
    (src / "ok" / "alias.png").symlink_to(src / "crack" / "c1.tif")
    dest = tmp_path / "raw"

    counts = import_folder(src, dest)

    assert counts["ok"] == 4
    assert (dest / "images" / "ok" / "alias.png").read_bytes() == (src / "crack" / "c1.tif").read_bytes()


def test_refuses_a_destination_inside_the_source(src):
    with pytest.raises(DataError, match="inside the source folder"):
        import_folder(src, src / "raw")


def test_unknown_mode_is_a_value_error(src, tmp_path):
    with pytest.raises(ValueError, match="copy, link"):
        import_folder(src, tmp_path / "raw", mode="move")
