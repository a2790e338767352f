"""lathe.measure.plots: real PNGs from matplotlib's Agg canvas, byte-stable, with errors that name the file."""

import subprocess
import sys

import numpy as np
import pytest

from lathe.errors import LatheError
from lathe.measure.plots import confusion_png, read_history, training_curves_png
from tests.tiny import ROOT, offline_env

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HISTORY = "epoch,round,round_epoch,train_loss,lr,val_accuracy,val_balanced_accuracy,val_defective_recall\n" + "".join(
    f"{e},{1 + (e - 1) // 2},{1 + (e - 1) % 2},{1.5 / e:.4f},0.001,{0.5 + e / 20:.3f},{0.4 + e / 25:.3f},{e / 5:.2f}\n"
    for e in range(1, 5))


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk."""
    assert data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def assert_stable_png(first: bytes, second: bytes) -> None:
    assert first.startswith(PNG_MAGIC) and first == second
    assert b"tIME" not in first and b"matplotlib" not in first  # no timestamp chunk, no version tag


def test_training_curves_from_a_history_csv(tmp_path):
    (tmp_path / "pruned.csv").write_text(HISTORY)
    history = read_history(tmp_path / "pruned.csv")
    assert history["epoch"] == [1.0, 2.0, 3.0, 4.0] and history["round"] == [1.0, 1.0, 2.0, 2.0]
    first, second = training_curves_png(history, "pruned"), training_curves_png(history, "pruned")
    assert_stable_png(first, second)
    assert png_size(first) == (1000, 380)  # 10 x 3.8 in at 100 dpi
    # the picture depends on the numbers: another loss curve gives other bytes
    assert training_curves_png({**history, "train_loss": [1.0, 1.0, 1.0, 1.0]}, "pruned") != first


def test_history_without_loss_or_with_a_bad_cell_names_the_file_and_line(tmp_path):
    (tmp_path / "a.csv").write_text("epoch,val_accuracy\n1,0.5\n")
    with pytest.raises(LatheError, match=r"a\.csv: the training history lacks columns \['train_loss'\]"):
        read_history(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("epoch,train_loss\n1,0.5\n2,oops\n")
    with pytest.raises(LatheError, match=r"b\.csv: line 3, column 'train_loss': 'oops' is not a number"):
        read_history(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("epoch,train_loss\n")
    with pytest.raises(LatheError, match=r"c\.csv: the training history has no rows"):
        read_history(tmp_path / "c.csv")
    with pytest.raises(LatheError, match=r"d\.csv: training history not found"):
        read_history(tmp_path / "d.csv")


CLASSES = ["functional", "possibly_defective", "probably_defective", "defective"]


def test_confusion_matrix_picture(tmp_path):
    cm = np.array([[50, 3, 1, 0], [10, 5, 2, 1], [2, 3, 4, 6], [0, 1, 2, 30]])
    first = confusion_png(cm, "quantized/student", CLASSES, [2, 3])
    second = confusion_png(cm, "quantized/student", CLASSES, [2, 3])
    assert_stable_png(first, second)
    assert png_size(first) == (480, 420)
    assert confusion_png(cm.T, "quantized/student", CLASSES, [2, 3]) != first
    with pytest.raises(LatheError, match=r"has shape \(2, 3\); expected \(K, K\)"):
        confusion_png(np.zeros((2, 3)), "x")


def test_a_matplotlibrc_does_not_change_the_bytes(tmp_path):
    """Drawn in fresh interpreters, with and without a user matplotlibrc that changes fonts and colours."""
    code = ("import sys, numpy as np; from lathe.measure.plots import confusion_png; "
            "sys.stdout.buffer.write(confusion_png(np.array([[3, 1], [0, 2]]), 't', ['ok', 'bad'], [1]))")
    env = offline_env() | {"PYTHONPATH": str(ROOT), "MPLCONFIGDIR": str(tmp_path / "plain")}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout
    (tmp_path / "styled").mkdir()
    (tmp_path / "styled" / "matplotlibrc").write_text("font.size: 20\nimage.cmap: magma\nsavefig.dpi: 300\n")
    styled = subprocess.run([sys.executable, "-c", code], env=env | {"MPLCONFIGDIR": str(tmp_path / "styled")},
                            capture_output=True, check=True).stdout
    assert plain.startswith(PNG_MAGIC) and plain == styled
