import numpy as np
import pytest
import torch

from lathe.config import TrainParams
from lathe.errors import DataError
from lathe.ingest import load_split
from lathe.teacher import FILES, check_trainable, load_model, train_teacher, write_model_dir
from lathe.train import class_weights, to_tensor
from tests.tiny import TINY_PARAMS, make_prepared


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("teacher"))


def test_class_weights_favour_rare_classes():
    w = class_weights(np.array([0, 0, 0, 0, 1, 2, 2, 3]), 4, "sqrt_inverse")
    assert w[1] > w[2] > w[0] and abs(float(w.mean()) - 1) < 1e-6
    assert torch.equal(class_weights(np.array([0, 1]), 4, "none"), torch.ones(4))


def test_train_writes_a_model_that_rebuilds_from_json_and_safetensors(prepared, tmp_path):
    cfg = TrainParams(**TINY_PARAMS["train_teacher"])
    model, result, size = train_teacher(prepared, cfg)
    assert size == 16 and len(result.history) == cfg.epochs and 1 <= result.best_epoch <= cfg.epochs
    check = load_split(prepared, "val")["images"]
    summary = write_model_dir(tmp_path / "m", model, cfg.arch, size, result, check)
    assert summary["onnx_max_abs_diff"] < 1e-4
    assert {p.name for p in (tmp_path / "m").iterdir()} == {FILES.weights, FILES.arch, FILES.onnx, FILES.summary}
    rebuilt = load_model(tmp_path / "m")
    x = to_tensor(check)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))


def test_two_trainings_give_byte_identical_onnx(prepared, tmp_path):
    cfg = TrainParams(**TINY_PARAMS["train_teacher"])
    check = load_split(prepared, "val")["images"]
    for name in ("a", "b"):
        model, result, size = train_teacher(prepared, cfg)
        write_model_dir(tmp_path / name, model, cfg.arch, size, result, check)
    for f in (FILES.onnx, FILES.weights):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_untrainable_data_is_refused_with_a_reason():
    one = {"labels": np.array([0])}
    with pytest.raises(DataError, match="train split has 1"):
        check_trainable(one, {"labels": np.array([0])}, 4)
    with pytest.raises(DataError, match="val split is empty"):
        check_trainable({"labels": np.array([0, 1])}, {"labels": np.array([], dtype=np.int64)}, 4)
    with pytest.raises(DataError, match=r"\[7\]"):
        check_trainable({"labels": np.array([0, 7])}, {"labels": np.array([0])}, 4)


def test_missing_model_files_are_named(tmp_path):
    from lathe.errors import LatheError

    with pytest.raises(LatheError, match="arch.json"):
        load_model(tmp_path)
