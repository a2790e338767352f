"""scripts/pretrained_probe.py and scripts/student_sweep.py: the parts the experiment records depend on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lathe.measure.evaluate import EvaluationResult
from lathe.model.lite import LiteNet
from scripts.student_sweep import TwinTeacher, against_teacher, same_cells
from tests.lite import lite_state


def result(labels: list[int], predicted: list[int]) -> EvaluationResult:
    n = len(labels)
    return EvaluationResult(metrics={}, sample_ids=np.arange(n), labels=np.array(labels), predicted=np.array(predicted),
                            p_defective=np.zeros(n), confusion=np.zeros((4, 4), np.int64), timing_method="")


def test_against_teacher_gives_agreement_and_the_paired_differences_in_points():
    labels = [0, 0, 1, 2, 3, 3, 0, 1]
    teacher = result(labels, [0, 0, 1, 2, 3, 0, 0, 1])  # 7 of 8 right, misses one defective
    student = result(labels, [0, 3, 1, 2, 3, 3, 0, 1])  # 7 of 8 right, one false reject instead
    out = against_teacher(student, teacher, defective=[2, 3], k=4)
    assert out["agreement"] == 0.75
    assert out["accuracy"]["diff_pt"] == 0.0
    assert out["defective_recall"]["diff_pt"] == pytest.approx(100 / 3, abs=1e-3)
    assert out["false_reject_rate"]["diff_pt"] == pytest.approx(100 / 5, abs=1e-3)
    low, high = out["defective_recall"]["ci95_pt"]
    assert low <= out["defective_recall"]["diff_pt"] <= high


def test_twin_teacher_answers_each_training_cell_with_its_twins_logits_and_refuses_other_rows():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    ids = np.array([40, 11, 23, 7, 3])
    twin = {int(i): rng.normal(size=4).astype(np.float32) for i in ids} | {99: np.zeros(4, np.float32)}
    teacher = TwinTeacher(images, ids, twin)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    got = teacher(x[[3, 0]])
    assert torch.equal(got, torch.from_numpy(np.stack([twin[7], twin[40]])))
    with pytest.raises(KeyError, match="not one of the training cells"):
        teacher(x[[3, 0]].flip(3))  # an augmented cell has no twin
    with pytest.raises(ValueError, match="no twin for 1 cell"):
        TwinTeacher(images, ids, {k: v for k, v in twin.items() if k != 23})


def test_same_cells_refuses_a_teacher_split_of_other_cells_or_order(tmp_path):
    a = {"sample_ids": np.array([1, 2, 3])}
    same_cells(a, {"sample_ids": np.array([1, 2, 3])}, tmp_path)
    with pytest.raises(ValueError, match="same cells"):
        same_cells(a, {"sample_ids": np.array([2, 1, 3])}, tmp_path)


def test_a_frozen_litenet_fine_tunes_under_simulated_int8_and_onnxruntime_agrees_with_torch(tmp_path):
    from lathe.compress.params import QatParams
    from lathe.data.ingest import load_split
    from lathe.measure.ort import load_session, predict
    from scripts.pretrained_probe import quantization_aware_int8
    from tests.tiny import TINY_PARAMS, make_prepared

    prepared = make_prepared(tmp_path)  # 16 px cells
    net = LiteNet(lite_state([8, 16, 16, 24]), num_classes=4, frozen_blocks=2, keep_blocks=3, head_channels=12)
    epochs = []
    qat_dir, check = quantization_aware_int8(net, tmp_path / "run", prepared, QatParams(**TINY_PARAMS["qat"]), None,
                                             epochs.append)
    assert net.frozen_blocks == -1 and all(p.requires_grad for p in net.parameters())  # the exporter needs no frozen region
    assert len(epochs) == TINY_PARAMS["qat"]["epochs"]
    assert "failed" not in check and check["argmax_agreement"] >= 0.9, check
    images = load_split(prepared, "test")["images"]
    assert predict(load_session(qat_dir / "model.onnx", 1), images).shape == (len(images), 4)


def test_the_probe_refuses_a_missing_or_foreign_saved_run_in_one_line(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import save_file

    from lathe.data.raw import generate_raw
    from lathe.model.teacher import FILES
    from tests.tiny import ROOT

    generate_raw(tmp_path / "raw", per_class_type=6, size=32)
    out = tmp_path / "out"

    def average() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "scripts.pretrained_probe", "--name", "r", "--seeds", "0",
                               "--image-size", "32", "--average", "--raw", str(tmp_path / "raw"), "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    saved = out / "r" / "seed0" / FILES.weights
    proc = average()
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"pretrained_probe: {saved}: no saved run (train --name r --seeds 0 first)"
    saved.parent.mkdir(parents=True)
    save_file({"_fc.weight": torch.zeros(2, 2)}, str(saved))  # weights, but of another network
    foreign = average()
    saved.write_bytes(b"not a safetensors file")
    garbage = average()
    for proc in (foreign, garbage):
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"pretrained_probe: {saved}: not the weights of this network: "), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "r" / "average").exists()
