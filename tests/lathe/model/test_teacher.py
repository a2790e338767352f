import numpy as np
import pytest
import torch

from lathe.data.ingest import load_split
from lathe.errors import DataError
from lathe.model.params import TrainParams
from lathe.model.teacher import FILES, check_trainable, load_model, train_teacher, write_model_dir
from lathe.model.train import class_weights, to_tensor
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
    # fit trains in the channels_last layout and must hand back ordinary contiguous weights
    assert all(t.is_contiguous() for t in model.state_dict().values())
    check = load_split(prepared, "val")["images"]
    summary = write_model_dir(tmp_path / "m", model, cfg.arch, size, result, check)
    assert summary["onnx_check"] == {"max_abs_diff_limit": 1e-4, "passed": True}
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


def test_mixup_trains_the_same_weights_twice_and_other_weights_than_without_it(prepared):
    base = TINY_PARAMS["train_teacher"]
    weights = [train_teacher(prepared, TrainParams(**{**base, "mixup": m}))[0].state_dict() for m in (0.4, 0.4, 0.0)]
    mixed, again, plain = weights
    assert all(torch.equal(mixed[k], again[k]) for k in mixed)
    assert not all(torch.equal(mixed[k], plain[k]) for k in mixed)


def ensemble_cfg(**ensemble) -> TrainParams:
    return TrainParams(**{**TINY_PARAMS["train_teacher"], "ensemble": {"members": 2, **ensemble}})


def test_ensemble_trains_each_member_then_the_distilled_teacher_and_reports_them(prepared, tmp_path):
    rows = []
    model, result, size = train_teacher(prepared, ensemble_cfg(), rows.append)
    epochs = TINY_PARAMS["train_teacher"]["epochs"]
    assert [r["member"] for r in rows] == [1] * epochs + [2] * epochs + [0] * epochs
    assert len(result.history) == epochs and len(result.members) == 2  # history: the distilled teacher's
    summary = write_model_dir(tmp_path / "m", model, TrainParams(**TINY_PARAMS["train_teacher"]).arch, size, result,
                              load_split(prepared, "val")["images"])
    assert [set(m) for m in summary["ensemble_members_best_val"]] == [set(result.best_val)] * 2


def test_ensemble_with_alpha_zero_is_exactly_a_plain_training_from_the_next_seed(prepared):
    """alpha = 0 drops the soft term, so the teacher is a plain run from seed + members: that pins
    down the seeds, and the next test shows the members' average is what changes the result."""
    plain_cfg = TrainParams(**{**TINY_PARAMS["train_teacher"], "seed": TINY_PARAMS["train_teacher"]["seed"] + 2})
    plain, _, _ = train_teacher(prepared, plain_cfg)
    ens, _, _ = train_teacher(prepared, ensemble_cfg(alpha=0.0))
    for (k, a), b in zip(plain.state_dict().items(), ens.state_dict().values()):
        assert torch.equal(a, b), k


def test_the_members_average_changes_the_teacher_and_training_stays_deterministic(prepared):
    weights = [train_teacher(prepared, ensemble_cfg(alpha=0.9))[0].state_dict() for _ in range(2)]
    no_soft = train_teacher(prepared, ensemble_cfg(alpha=0.0))[0].state_dict()
    assert all(torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values()))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0].values(), no_soft.values()))


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


def test_members_trained_in_parallel_processes_give_the_same_teacher_as_one_after_another(prepared):
    serial_rows, parallel_rows = [], []
    serial, s_result, _ = train_teacher(prepared, ensemble_cfg(parallel=1), serial_rows.append)
    parallel, p_result, _ = train_teacher(prepared, ensemble_cfg(parallel=2), parallel_rows.append)
    for (k, a), b in zip(serial.state_dict().items(), parallel.state_dict().values()):
        assert torch.equal(a, b), k
    assert s_result.members == p_result.members and s_result.history == p_result.history
    # every progress row of both members reached the stage, whatever order the two processes sent them in
    def key(r: dict) -> tuple:
        return r["member"], r["epoch"]

    assert sorted(serial_rows, key=key) == sorted(parallel_rows, key=key)
