"""Quantization-aware fine-tuning (lathe.compress.qat): real torchao PT2E QAT on tiny data, real onnxruntime."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.nn import functional as F  # noqa: N812

from lathe.compress.distill import distill_student
from lathe.compress.params import DistillParams, QatParams
from lathe.compress.qat import (
    CONV_BN_PASSES,
    CONV_OPS,
    RECORD_FILE,
    SOURCE_SHA_KEY,
    TEACHER_SHA_KEY,
    TORCH_SQRT,
    QatNet,
    check_against_torch,
    conv_bn_passes_for_present_convs,
    convert,
    has_conv_kind,
    prepare_qat,
    qat_finetune,
    quantize_biases,
    skip_absent_conv_kinds,
    write_qat,
)
from lathe.compress.quant_inspect import runtime_node_types
from lathe.data.ingest import load_split
from lathe.determinism import exact_sqrt
from lathe.errors import LatheError
from lathe.io import sha256_file
from lathe.measure.evaluate import evaluate_model
from lathe.measure.ort import MODEL_FILE
from lathe.measure.params import EvaluateParams
from lathe.model.params import TrainParams
from lathe.model.teacher import FILES, load_model, train_teacher
from tests.lathe.compress.test_distill import write_arch_and_weights
from tests.tiny import TINY_PARAMS, make_prepared


def tiny_cfg(**overrides) -> QatParams:
    return QatParams(**{**TINY_PARAMS["qat"], **overrides})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny prepared data (16 px), a tiny teacher and a student distilled from it (arch + weights)."""
    root = tmp_path_factory.mktemp("qat")
    prepared = make_prepared(root)
    tcfg = TrainParams(**{**TINY_PARAMS["train_teacher"], "epochs": 3})
    teacher, _, size = train_teacher(prepared, tcfg)
    write_arch_and_weights(root / "teacher", teacher, tcfg.arch, size)
    student = distill_student(root / "teacher", prepared, DistillParams(**TINY_PARAMS["distill"]))
    write_arch_and_weights(root / "student", student.model, student.spec, size)
    return root


@pytest.fixture(scope="module")
def first(inputs, tmp_path_factory):
    """One QAT run of the student (distilled from the teacher), written to a folder."""
    out = tmp_path_factory.mktemp("qat-out") / "a"
    result = qat_finetune(inputs / "student", inputs / "prepared", tiny_cfg(), inputs / "teacher")
    write_qat(out, result)
    return out, result


def test_qat_writes_an_int8_model_that_onnxruntime_runs_in_integer_kernels(inputs, first):
    out, result = first
    assert sorted(p.name for p in out.iterdir()) == [MODEL_FILE, RECORD_FILE]
    record = json.loads((out / RECORD_FILE).read_text())
    assert record == result.record
    proto = onnx.load(str(out / MODEL_FILE))
    convs = record["node_types"]["Conv"]
    assert convs >= 3 and record["node_types"]["QuantizeLinear"] > convs and record["float_compute_nodes"] == []
    # every conv, every residual add, the pooling and the classifier run as integer kernels, none in float
    ran = runtime_node_types(proto.SerializeToString())
    assert ran.get("com.microsoft.QLinearConv") == convs and ran.get("com.microsoft.QGemm") == 1
    assert ran.get("com.microsoft.QLinearAdd") == record["node_types"]["Add"]
    assert not {"Conv", "FusedConv", "com.microsoft.FusedConv", "Add", "Gemm", "AveragePool"} & set(ran)
    # biases are int32 at input scale x weight scale, as onnxruntime's own quantizer writes them
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    for node in (n for n in proto.graph.node if n.op_type == "Conv"):
        bias_dq = producer[node.input[2]]
        assert bias_dq.op_type == "DequantizeLinear" and inits[bias_dq.input[0]].data_type == TensorProto.INT32
    # no exporter notes (the torch graph per node, intermediate shapes): weights, not debug text
    assert not any(n.metadata_props for n in proto.graph.node) and not proto.graph.value_info
    # the float model and teacher it came from, by hash, in the file and the record
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[SOURCE_SHA_KEY] == sha256_file(inputs / "student" / FILES.weights) == record["source"]["weights_sha256"]
    assert meta[TEACHER_SHA_KEY] == sha256_file(inputs / "teacher" / FILES.weights)
    assert record["check_vs_torch"]["argmax_agreement"] >= 0.75 and record["size_bytes"] == (out / MODEL_FILE).stat().st_size
    assert record["quantization"]["weights"] == "int8 per channel, symmetric, -64..63"
    assert len(result.fit.history) == tiny_cfg().epochs and 1 <= record["best_epoch"] <= tiny_cfg().epochs


def test_qat_weights_are_7_bit_like_the_ptq_path(first):
    proto = onnx.load(str(first[0] / MODEL_FILE))
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in (n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")):
        weights = inits[producer[node.input[1]].input[0]]
        assert weights.dtype == np.int8 and weights.min() >= -64 and weights.max() <= 63, node.name


def test_the_evaluate_stage_reads_the_qat_folder_like_any_variant(inputs, first):
    cfg = EvaluateParams(latency_warmup=0, latency_runs=2, throughput_batch=4, throughput_runs=1)
    metrics = evaluate_model(first[0], inputs / "prepared", cfg).metrics
    assert metrics["size_bytes"] == (first[0] / MODEL_FILE).stat().st_size and 0 <= metrics["accuracy"] <= 1


def test_two_qat_runs_are_byte_identical(inputs, first, tmp_path):
    write_qat(tmp_path / "b", qat_finetune(inputs / "student", inputs / "prepared", tiny_cfg(), inputs / "teacher"))
    for name in (MODEL_FILE, RECORD_FILE):
        assert (tmp_path / "b" / name).read_bytes() == (first[0] / name).read_bytes(), name


def calls(graph, target) -> int:
    return sum(1 for n in graph.graph.nodes if n.op == "call_function" and n.target is target)


def test_training_takes_batchnorm_std_from_exact_sqrt_and_convert_folds_it(inputs):
    """torch's float32 sqrt (MKL vector math) differs in the last bit between CPUs; the prepared graph
    trains with exact_sqrt, and convert gives convert_pt2e its own pattern back, which it then folds."""
    model = load_model(inputs / "student")
    net = QatNet(prepare_qat(model, 16, 1))  # the tiny data's image size
    n_bn = sum(1 for n in net.graph.graph.nodes if n.target is torch.ops.aten.batch_norm.default)
    assert n_bn > 0 and calls(net.graph, exact_sqrt) == n_bn and calls(net.graph, TORCH_SQRT) == 0
    converted = convert(net)
    assert calls(converted, exact_sqrt) == 0 and calls(converted, TORCH_SQRT) == 0
    assert not any(n.target is torch.ops.aten.batch_norm.default for n in converted.graph.nodes)


def test_conv_bn_passes_run_only_for_the_conv_kinds_the_graph_has(inputs):
    """torchao fuses and folds conv-BatchNorm per conv kind, tracing that kind's patterns each time; our
    graphs have conv2d alone and the other kinds' passes are skipped. (That the fold still happens is the
    test above; that the INT8 bytes are unchanged, tests/tiny_digest.json.)"""
    from torchao.quantization.pt2e import qat_utils

    graph = prepare_qat(load_model(inputs / "student"), 16, 1)
    assert [fn for fn in CONV_OPS if has_conv_kind(graph, fn)] == [F.conv2d]

    seen = []

    def recording_pass(g, conv_fn, *args, **kwargs):
        seen.append(conv_fn)
        return g

    wrapped = skip_absent_conv_kinds(recording_pass)
    assert all(wrapped(graph, fn, (), is_cuda=False) is graph for fn in CONV_OPS)
    assert seen == [F.conv2d]

    # the pinned torchao still has both passes (an upgrade that renames them would lose the speed-up)
    originals = [getattr(qat_utils, name) for name in CONV_BN_PASSES]
    with conv_bn_passes_for_present_convs():
        patched = [getattr(qat_utils, name) for name in CONV_BN_PASSES]
        assert [p.__wrapped__ for p in patched] == originals
    assert [getattr(qat_utils, name) for name in CONV_BN_PASSES] == originals  # restored on exit


def test_exact_sqrt_is_ieee_sqrt_where_torch_sqrt_is_not():
    values = np.random.default_rng(0).random(100_000, dtype=np.float32) * 3 + np.float32(1e-5)
    want = np.sqrt(values)  # numpy: the instruction, correctly rounded
    assert np.array_equal(exact_sqrt(torch.from_numpy(values)).numpy(), want)
    assert exact_sqrt(torch.from_numpy(values)).dtype == torch.float32


def test_alpha_zero_fine_tunes_on_the_labels_without_a_teacher(inputs, tmp_path):
    result = qat_finetune(inputs / "student", inputs / "prepared", tiny_cfg(alpha=0.0))
    assert result.record["teacher"] is None and "distillation" not in result.record["method"]


def test_a_max_pool_student_also_runs_every_layer_in_integer_kernels(inputs, tmp_path):
    """pool: max (the teacher's and student's default) exports a MaxPool that onnxruntime runs on int8."""
    student = {**TINY_PARAMS["distill"]["student"], "pool": "max"}
    distilled = distill_student(inputs / "teacher", inputs / "prepared",
                                DistillParams(**{**TINY_PARAMS["distill"], "student": student}))
    write_arch_and_weights(tmp_path / "student", distilled.model, distilled.spec, 16)
    result = qat_finetune(tmp_path / "student", inputs / "prepared", tiny_cfg(alpha=0.0))
    write_qat(tmp_path / "q", result)
    assert result.record["node_types"]["MaxPool"] == 1 and result.record["float_compute_nodes"] == []
    ran = runtime_node_types((tmp_path / "q" / MODEL_FILE).read_bytes())
    assert ran.get("com.microsoft.NhwcMaxPool") == 1 and ran.get("com.microsoft.QGemm") == 1
    assert not {"Conv", "FusedConv", "Add", "Gemm", "MaxPool"} & set(ran)


def test_a_broken_export_is_refused_naming_the_model(inputs):
    """onnxruntime's model must give torch's answers: negated logits (argmax becomes argmin) do not."""
    model = load_model(inputs / "student")
    size = model.image_size
    net = QatNet(prepare_qat(model, size, 1))
    converted = convert(net)
    from lathe.compress.qat import export_qat_onnx

    proto = onnx.load_from_string(export_qat_onnx(converted, size, 1, {}))
    out = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [f"{o}_raw" if o == out else o for o in node.output]
    proto.graph.node.append(helper.make_node("Neg", [f"{out}_raw"], [out]))
    images = load_split(inputs / "prepared", "val")["images"]
    with pytest.raises(LatheError, match=r"students?.*different answers on \d+ of \d+ val images.*broken"):
        check_against_torch(proto.SerializeToString(), converted, images, str(inputs / "student"))


def test_missing_model_folder_is_named(inputs, tmp_path):
    with pytest.raises(LatheError, match="nothing-here: float model folder not found"):
        qat_finetune(tmp_path / "nothing-here", inputs / "prepared", tiny_cfg())


def test_corrupt_weights_are_named(inputs, tmp_path):
    bad = tmp_path / "student"
    bad.mkdir()
    (bad / FILES.arch).write_bytes((inputs / "student" / FILES.arch).read_bytes())
    (bad / FILES.weights).write_bytes(b"\x00" * 64)
    with pytest.raises(LatheError, match="weights.safetensors: unreadable safetensors file"):
        qat_finetune(bad, inputs / "prepared", tiny_cfg())


def test_a_model_for_another_image_size_is_refused(inputs, tmp_path):
    doc = json.loads((inputs / "student" / FILES.arch).read_text())
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / FILES.arch).write_text(json.dumps({**doc, "image_size": 32}))
    (folder / FILES.weights).write_bytes((inputs / "student" / FILES.weights).read_bytes())
    with pytest.raises(LatheError, match="built for 32 px images but the prepared data is 16 px"):
        qat_finetune(folder, inputs / "prepared", tiny_cfg())


def test_a_missing_teacher_is_named(inputs, tmp_path):
    with pytest.raises(LatheError, match="no-teacher: teacher folder not found"):
        qat_finetune(inputs / "student", inputs / "prepared", tiny_cfg(), tmp_path / "no-teacher")


# quantize_biases on a hand-made graph


def conv_graph(bias: np.ndarray, x_scale: float = 0.02, w_scale: tuple[float, float] = (0.01, 0.03)) -> onnx.ModelProto:
    """image -> Q/DQ -> Conv(DQ weights (2 output channels, per-channel scales), float bias) -> logits."""
    rng = np.random.default_rng(0)
    w = rng.integers(-64, 64, size=(2, 1, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(x_scale, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(w_scale, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(2, np.int8), "wz"), numpy_helper.from_array(bias.astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["image", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "b"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 5, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, 3, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def run_graph(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


def test_quantize_biases_writes_int32_at_input_times_weight_scale_and_keeps_the_output():
    bias = np.array([0.1234, -0.5], np.float32)
    proto = conv_graph(bias)
    x = np.random.default_rng(1).random((1, 1, 5, 5), dtype=np.float32)
    before = run_graph(proto, x)
    assert quantize_biases(proto) == 1
    onnx.checker.check_model(proto, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert "b" not in inits and inits["b_quantized"].dtype == np.int32
    np.testing.assert_array_equal(inits["b_quantized"], np.round(bias / (0.02 * np.array([0.01, 0.03], np.float32))))
    np.testing.assert_allclose(inits["b_scale"], 0.02 * np.array([0.01, 0.03], np.float32))
    # the bias moves by at most half a step of its scale
    assert np.abs(run_graph(proto, x) - before).max() <= 0.5 * 0.02 * 0.03 + 1e-7
    assert [n.op_type for n in proto.graph.node][-2:] == ["DequantizeLinear", "Conv"]


def test_quantize_biases_leaves_a_float_conv_and_an_oversized_bias_alone():
    proto = conv_graph(np.array([1e9, 0.0], np.float32), x_scale=1e-3, w_scale=(1e-3, 1e-3))
    assert quantize_biases(proto) == 0 and any(t.name == "b" for t in proto.graph.initializer)
    float_conv = conv_graph(np.zeros(2, np.float32))
    conv = next(n for n in float_conv.graph.node if n.op_type == "Conv")
    conv.input[0] = "image"  # its input is not dequantized: a float convolution
    assert quantize_biases(float_conv) == 0
