import functools
import math
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from lathe.data.contract import Task
from lathe.errors import DataError, LatheError
from lathe.io import save_arrays
from lathe.measure.evaluate import evaluate_model, quality_metrics
from lathe.measure.metrics import TIMING_KEYS
from lathe.measure.ort import (
    count_onnx_macs,
    count_onnx_params,
    load_session,
    measure_latency,
    measure_throughput,
    model_files,
    predict,
    softmax,
)
from lathe.measure.params import EvaluateParams
from lathe.model.arch import build_model, count_params
from lathe.model.export import INPUT_NAME, export_onnx
from lathe.model.params import ArchSpec
from tests.tiny import write_tiny_task

SIZE = 16
FAST = EvaluateParams(latency_warmup=1, latency_runs=5, throughput_batch=4, throughput_runs=1)


@functools.lru_cache(maxsize=1)
def tiny_model() -> tuple[torch.nn.Module, bytes]:
    """A tiny real CNN and its ONNX export (exported once per test session: export takes seconds).

    BatchNorm gets non-trivial statistics so the exporter folds it into conv weights *and* biases.
    """
    torch.manual_seed(0)
    model = build_model(ArchSpec(stem_channels=4, widths=[4, 8], blocks=[1, 1]), SIZE)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    return model, export_onnx(model, SIZE)


def write_model_dir(path, model_bytes=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(model_bytes or tiny_model()[1])
    (path / "weights.safetensors").write_bytes(b"not part of the deployable model" * 100)
    return path


def write_test_split(prepared, n=12, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    save_arrays(prepared / "test.safetensors", {
        "images": rng.integers(0, 256, (n, size, size), dtype=np.uint8),
        "labels": (np.arange(n) % 4).astype(np.int64),
        "sample_ids": np.arange(100, 100 + n, dtype=np.int64),
    })
    return write_tiny_task(prepared, size)


def torch_macs(model, size):
    """MACs per image counted on the torch side with forward hooks (Conv2d and Linear only)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        else:
            total += out.numel() * m.in_features

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    for h in handles:
        h.remove()
    return total


# --- pure metrics -------------------------------------------------------------------------------


TASK = Task(classes=["ok", "minor", "major", "scrap"], defective=["major", "scrap"], image_size=8)


def test_quality_metrics_on_a_hand_computed_case():
    labels = np.array([0, 0, 1, 2, 3, 3])
    predicted = np.array([0, 1, 1, 3, 3, 0])
    logits = np.eye(4, dtype=np.float32)[predicted] * 5.0
    m = quality_metrics(labels, logits, TASK)
    assert m["accuracy"] == round(3 / 6, 6)
    assert [m[f"recall_{c}"] for c in TASK.classes] == [0.5, 1.0, 0.0, 0.5]
    assert m["balanced_accuracy"] == 0.5
    # defective truth idx 3,4,5; predicted defective idx 3,4 -> tp 2, fn 1, fp 0, tn 3
    assert m["defective_recall"] == round(2 / 3, 6) and m["escape_rate"] == round(1 / 3, 6)
    assert m["defective_precision"] == 1.0 and m["false_reject_rate"] == 0.0
    assert m["n_test"] == 6
    assert all(isinstance(v, (int, float)) for v in m.values())


def test_defective_classes_need_not_be_the_last_ones_and_absent_classes_give_zero_not_nan():
    task = Task(classes=["scrap", "ok", "dent"], defective=["scrap", "dent"], image_size=8)
    labels, predicted = np.array([0, 1, 1, 2]), np.array([2, 1, 0, 2])  # scrap->dent is still caught
    m = quality_metrics(labels, np.eye(3, dtype=np.float32)[predicted], task)
    assert m["defective_recall"] == 1.0 and m["false_reject_rate"] == 0.5
    m = quality_metrics(np.array([1, 1]), np.eye(3, dtype=np.float32)[[1, 1]], task)
    assert m["recall_scrap"] == 0.0 and m["defective_recall"] == 0.0 and m["accuracy"] == 1.0


def test_softmax_rows_sum_to_one_and_p_defective_is_the_tail_mass():
    p = softmax(np.log(np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32)))
    np.testing.assert_allclose(p, [[0.1, 0.2, 0.3, 0.4]], rtol=1e-6)
    assert abs(p[0, 2:].sum() - 0.7) < 1e-6


# --- graph statistics ---------------------------------------------------------------------------


def hand_built_model():
    """(N,1,8,8) -> Conv 1->4 k3 p1 (+bias) -> depthwise Conv k3 s2 p1 -> Flatten -> Gemm 64->5 -> MatMul 5->2."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((5, 64)).astype(np.float32), "w3"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b3"),
        numpy_helper.from_array(rng.standard_normal((5, 2)).astype(np.float32), "w4"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=4),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "w4"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_macs_and_params_of_a_hand_built_graph():
    model = hand_built_model()
    onnx.checker.check_model(model)
    # conv1: 4*8*8 outputs * 1*3*3 = 2304; depthwise: 4*4*4 * 1*3*3 = 576; Gemm 1*64*5 = 320; MatMul 1*5*2 = 10
    assert count_onnx_macs(model, 8) == 2304 + 576 + 320 + 10
    assert count_onnx_params(model) == 36 + 4 + 36 + 320 + 5 + 10


def test_macs_refuse_a_mismatched_image_size():
    with pytest.raises(LatheError, match="8x8"):
        count_onnx_macs(hand_built_model(), 16)


def test_params_and_macs_of_the_exported_model_match_torch():
    model, data = tiny_model()
    proto = onnx.load_from_string(data)
    # The exporter folds each BatchNorm (scale + shift: 2*C params) into its conv's weight and a new C-bias.
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert count_onnx_params(proto) == count_params(model) - bn_channels
    assert count_onnx_macs(proto, SIZE) == torch_macs(model, SIZE)


@pytest.fixture(scope="module")
def qdq_dir(tmp_path_factory):
    """The tiny model statically quantized to int8 QDQ, as the quantize stage will do it."""
    tmp = tmp_path_factory.mktemp("qdq")
    (tmp / "float.onnx").write_bytes(tiny_model()[1])
    quant_pre_process(str(tmp / "float.onnx"), str(tmp / "pre.onnx"))

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.feeds = iter([{INPUT_NAME: rng.random((1, 1, SIZE, SIZE), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    (tmp / "model").mkdir()
    quantize_static(str(tmp / "pre.onnx"), str(tmp / "model" / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return tmp / "model"


def test_qdq_model_has_the_float_models_macs_and_params(qdq_dir):
    float_proto = onnx.load_from_string(tiny_model()[1])
    qdq = onnx.load(str(qdq_dir / "model.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in qdq.graph.node)
    assert any(t.data_type == TensorProto.INT8 for t in qdq.graph.initializer)
    assert count_onnx_params(qdq) == count_onnx_params(float_proto)
    assert count_onnx_macs(qdq, SIZE) == count_onnx_macs(float_proto, SIZE)


def test_qdq_model_evaluates(qdq_dir, tmp_path):
    result = evaluate_model(qdq_dir, write_test_split(tmp_path), FAST)
    assert result.metrics["params"] == count_onnx_params(onnx.load_from_string(tiny_model()[1]))
    assert result.metrics["size_bytes"] == (qdq_dir / "model.onnx").stat().st_size


# --- files and size -----------------------------------------------------------------------------


def save_external(dest_dir, location="model.onnx.data"):
    """Weights to a side file; tiny tensors (the Reshape target shape) stay inline, as onnxruntime needs."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    proto = onnx.load_from_string(tiny_model()[1])
    onnx.save_model(proto, str(dest_dir / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=64)
    return dest_dir / "model.onnx"


def test_size_counts_external_data_but_not_side_files(tmp_path):
    onnx_path = save_external(tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").write_bytes(b"x" * 5000)
    data = tmp_path / "m" / "model.onnx.data"
    assert model_files(onnx_path) == [onnx_path, data]
    result = evaluate_model(tmp_path / "m", write_test_split(tmp_path / "prep"), FAST)
    assert result.metrics["size_bytes"] == onnx_path.stat().st_size + data.stat().st_size
    # every weight but the few small biases left inline is in the side file, 4 bytes per float
    assert data.stat().st_size >= 4 * (result.metrics["params"] - 64)


def test_external_data_outside_the_folder_is_refused(tmp_path):
    onnx_path = save_external(tmp_path / "m")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../stolen.data"
    shutil.move(tmp_path / "m" / "model.onnx.data", tmp_path / "stolen.data")
    onnx.save_model(proto, str(onnx_path))
    with pytest.raises(LatheError, match=r"model\.onnx.*outside"):
        model_files(onnx_path)


def test_missing_external_data_file_is_named(tmp_path):
    onnx_path = save_external(tmp_path / "m")
    (tmp_path / "m" / "model.onnx.data").unlink()
    with pytest.raises(LatheError, match=r"model\.onnx\.data is missing"):
        model_files(onnx_path)


# --- running ------------------------------------------------------------------------------------


def test_predict_matches_torch_on_uint8_images(tmp_path):
    model, data = tiny_model()
    write_model_dir(tmp_path)
    session = load_session(tmp_path / "model.onnx", threads=1)
    images = np.random.default_rng(1).integers(0, 256, (7, SIZE, SIZE), dtype=np.uint8)
    logits = predict(session, images, batch=3)  # 3 + 3 + 1: the tail batch is handled
    with torch.no_grad():
        want = model(torch.from_numpy(images.astype(np.float32) / 255)[:, None]).numpy()
    assert logits.shape == (7, 4)
    np.testing.assert_allclose(logits, want, atol=1e-4)


def test_latency_and_throughput_are_positive(tmp_path):
    write_model_dir(tmp_path)
    session = load_session(tmp_path / "model.onnx", threads=1)
    p50, p95 = measure_latency(session, SIZE, warmup=1, runs=5)
    assert 0 < p50 <= p95
    assert measure_throughput(session, SIZE, batch=4, runs=2) > 0


def test_evaluate_model_reports_everything_and_quality_is_deterministic(tmp_path):
    model_dir, prepared = write_model_dir(tmp_path / "m"), write_test_split(tmp_path / "prep")
    first, second = evaluate_model(model_dir, prepared, FAST), evaluate_model(model_dir, prepared, FAST)
    m = first.metrics
    expected = {"accuracy", "balanced_accuracy", "macro_f1", "recall_functional", "recall_possibly_defective",
                "recall_probably_defective", "recall_defective", "defective_recall", "defective_precision",
                "escape_rate", "false_reject_rate", "n_test", "size_bytes", "params", "macs", *TIMING_KEYS}
    assert expected <= set(m)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values())
    assert m["n_test"] == 12 and m["size_bytes"] == (model_dir / "model.onnx").stat().st_size
    assert all(m[k] > 0 for k in TIMING_KEYS)
    strip = lambda d: {k: v for k, v in d.items() if k not in TIMING_KEYS}  # noqa: E731
    assert strip(first.metrics) == strip(second.metrics)
    np.testing.assert_array_equal(first.p_defective, second.p_defective)
    assert first.sample_ids.tolist() == list(range(100, 112))
    assert np.all((first.p_defective >= 0) & (first.p_defective <= 1))
    # rows: true class, columns: predicted; the counts add up to the split and agree with accuracy
    assert first.confusion.shape == (4, 4) and first.confusion.sum() == 12
    assert np.trace(first.confusion) / 12 == pytest.approx(m["accuracy"], abs=1e-6)
    assert first.timing_method == ("evaluate stage: onnxruntime CPU, batch 1, 1 thread, p50/p95 of 5 calls after 1 "
                                   "warm-up calls, each model timed alone, in its own stage run; throughput: median "
                                   "of 1 calls at batch 4")


# --- failures -----------------------------------------------------------------------------------


def test_missing_model_names_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(LatheError, match=r"m/model\.onnx: model file not found"):
        evaluate_model(tmp_path / "m", write_test_split(tmp_path / "prep"), FAST)


def test_unreadable_model_names_the_file(tmp_path):
    write_model_dir(tmp_path / "m", b"\x08\x07garbage that is not a model")
    with pytest.raises(LatheError, match=r"model\.onnx"):
        evaluate_model(tmp_path / "m", write_test_split(tmp_path / "prep"), FAST)


def test_model_that_onnxruntime_cannot_load_names_the_file(tmp_path):
    bad = hand_built_model()
    bad.graph.node[0].op_type = "NoSuchOp"
    write_model_dir(tmp_path / "m", bad.SerializeToString())
    with pytest.raises(LatheError, match=r"model\.onnx: onnxruntime cannot load"):
        evaluate_model(tmp_path / "m", write_test_split(tmp_path / "prep", size=8), FAST)


def test_image_size_mismatch_names_both_files(tmp_path):
    with pytest.raises(LatheError, match=r"model\.onnx.*16x16.*test\.safetensors.*24x24"):
        evaluate_model(write_model_dir(tmp_path / "m"), write_test_split(tmp_path / "prep", size=24), FAST)


def test_empty_test_split_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"test\.safetensors: the test split is empty"):
        evaluate_model(write_model_dir(tmp_path / "m"), write_test_split(tmp_path / "prep", n=0), FAST)
