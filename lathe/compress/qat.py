"""Quantization-aware fine-tuning (QAT): a trained float network fine-tuned under simulated INT8, with
torchao's PT2E flow, and exported to the same ONNX QDQ format the quantize stage writes.

Post-training quantization (lathe.compress.quantize) rounds a finished network's weights and
activations; the network never sees that rounding. Here it does (Jacob et al. 2018):

1. `torch.export` the float network (dynamic batch) and `prepare_qat_pt2e` it with an x86 quantizer
   (`qat_quantizer`): every conv/linear (with its BatchNorm and ReLU, fused as one group) gets fake
   quantizers on its weight (per channel) and on the activations around it.
2. Fine-tune with `lathe.model.train.fit` (the same loop, optimizer and val selection as every other
   stage), distilling from the teacher as the distill stage does. Observers follow the activation
   ranges while training and are frozen whenever the network is judged (`QatNet.train`).
3. `convert_pt2e` folds BatchNorm into the convolutions and turns the fake quantizers into
   quantize/dequantize pairs; torch.onnx writes QuantizeLinear/DequantizeLinear.
4. `quantize_biases`: the exporter leaves conv/linear biases in float, and onnxruntime then runs the
   convolution in float between dequantize and quantize; as int32 (scale = input scale x weight
   scale, what onnxruntime's own quantizer writes) it fuses each group into one QLinearConv.

Number formats are the PTQ path's: activations uint8 (per tensor, affine), weights int8 per channel
(symmetric) limited to 7 bits (-64..63, lathe.compress.quantize.REDUCE_RANGE: no saturating pair on CPUs
without VNNI, so the INT8 model computes the same bits on every x86 CPU).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F  # noqa: N812 (torch's own spelling)

from lathe.compress.distill import check_fits, load_model_dir
from lathe.compress.params import QatParams
from lathe.compress.quant_inspect import float_compute_nodes, node_type_counts
from lathe.compress.records import QAT_RECORD
from lathe.data.contract import Task, read_task
from lathe.data.ingest import load_split
from lathe.determinism import exact_sqrt, make_deterministic, numerics_record
from lathe.errors import LatheError
from lathe.io import sha256_bytes, sha256_file, write_bytes, write_json
from lathe.measure.ort import MODEL_FILE, load_session, predict, to_input
from lathe.model.export import export_onnx
from lathe.model.teacher import FILES, check_trainable
from lathe.model.train import (
    Progress,
    TrainResult,
    class_weights,
    cross_entropy_loss,
    fit,
    frozen_teacher,
    kd_loss,
    memoized_teacher,
    predict_logits,
    to_tensor,
)

log = logging.getLogger(__name__)

RECORD_FILE = QAT_RECORD
WEIGHT_QMIN, WEIGHT_QMAX = -64, 63  # 7-bit weights, as lathe.compress.quantize.REDUCE_RANGE (see module doc)
# metadata_props of every QAT model: the float network it was fine-tuned from, and its teacher
SOURCE_SHA_KEY = "lathe.qat.source_weights_sha256"
TEACHER_SHA_KEY = "lathe.qat.teacher_weights_sha256"
CHECK_SPLIT = "val"  # held-out images on which onnxruntime's INT8 model is compared with torch's simulation
# onnxruntime's integer kernels round where torch's simulation computes in float: a logit moves by a step
# or two of a layer's scale, which changes the answer only on near-ties. A broken export changes most.
MAX_DISAGREEMENT = 0.05  # fraction of the check images whose argmax may differ (at least 2 images)
# ops whose bias is quantized: weight per output channel on axis 0 (Conv (O, I, kH, kW); Gemm transB (O, I)),
# bias (O,), so the bias scale is input scale x weight scale, element by element
BIAS_OPS = ("Conv", "Gemm")
TORCH_SQRT = torch.ops.aten.sqrt.default  # in the prepared graph: BatchNorm's running std (swap_calls)


# ---------------------------------------------------------------------------------------------
# The quantizer and the prepared network


def qat_quantizer() -> Any:
    """torchao's x86 quantizer in QAT mode, with the PTQ path's number formats (module doc)."""
    from torchao.quantization.pt2e import FusedMovingAvgObsFakeQuantize, MovingAveragePerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        QuantizationConfig,
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    default = get_default_x86_inductor_quantization_config(is_qat=True)
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=WEIGHT_QMIN, quant_max=WEIGHT_QMAX, qscheme=torch.per_channel_symmetric,
        ch_axis=0, is_dynamic=False,
        observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, quant_min=WEIGHT_QMIN, quant_max=WEIGHT_QMAX,
            dtype=torch.int8, qscheme=torch.per_channel_symmetric, ch_axis=0, eps=2**-12),
    )
    config = QuantizationConfig(default.input_activation, default.output_activation, weight, None, is_qat=True)
    treat_torch_relu_as_relu()

    class OnnxRuntimeQuantizer(X86InductorQuantizer):
        """Without the conv + add (+ relu) groups: for inductor those are one int8 kernel that takes the
        convolution's float output; onnxruntime has no such kernel and would run those convolutions in
        float (measured: 2 of 6 here). Alone, each convolution's output is quantized (a QLinearConv)
        and the residual add takes two quantized inputs (a QLinearAdd). These are private methods of
        torchao's quantizer (pinned in requirements.lock); tests/lathe/compress/test_qat.py checks that
        onnxruntime runs every conv, add and the classifier in integer kernels, so a change shows."""

        def _annotate_qat_conv2d_bn_binary_unary(self, *args: Any, **kwargs: Any) -> None:
            pass

        def _annotate_qat_conv2d_bn_binary(self, *args: Any, **kwargs: Any) -> None:
            pass

        def _annotate_conv2d_binary_unary(self, *args: Any, **kwargs: Any) -> None:
            pass

        def _annotate_conv2d_binary(self, *args: Any, **kwargs: Any) -> None:
            pass

        def _annotate_conv2d_fusion_pattern(self, model: torch.fx.GraphModule, config: Any,
                                            filter_fn: Any = None) -> None:
            super()._annotate_conv2d_fusion_pattern(model, config, filter_fn)
            if config is not None:
                annotate_residual_outputs(model, config)

    return OnnxRuntimeQuantizer().set_global(config)


def annotate_residual_outputs(model: torch.fx.GraphModule, config: Any) -> None:
    """Quantize the output of every residual add (after its ReLU, if one follows), so the add runs as a
    QLinearAdd and what follows it (the pooling before the classifier) takes int8 too. Without it the
    last block's add, ReLU and pooling run in float (measured). For the global config only: the
    quantizer's filters pass a pattern only when it holds a conv, linear or pooling op."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        QUANT_ANNOTATION_KEY,
        _is_any_annotated,
        _mark_nodes_as_annotated,
        _X86InductorQuantizationAnnotation,
        get_output_act_qspec,
    )

    relus = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}
    for node in model.graph.nodes:
        if node.target is not torch.ops.aten.add.Tensor or len(node.all_input_nodes) != 2:
            continue
        users = list(node.users)
        out = users[0] if len(users) == 1 and users[0].target in relus else node
        if _is_any_annotated([node, out]):
            continue
        out.meta[QUANT_ANNOTATION_KEY] = _X86InductorQuantizationAnnotation(
            output_qspec=get_output_act_qspec(config), _annotated=True, _is_output_of_quantized_pattern=True)
        _mark_nodes_as_annotated([node])


def treat_torch_relu_as_relu() -> None:
    """Let the quantizer's conv-bn-relu patterns match `torch.relu` (our blocks' activation) as they match
    nn.ReLU and F.relu; without it the ReLU after each residual block is quantized on its own (21 Q
    nodes instead of 15, measured)."""
    from torchao.quantization.pt2e.graph_utils import get_equivalent_types, update_equivalent_types_dict

    groups = [set(g) for g in get_equivalent_types()]
    relu = next((g for g in groups if nn.ReLU in g), None)
    if relu is not None and torch.relu not in relu:
        relu.add(torch.relu)
        update_equivalent_types_dict(groups)


def prepare_qat(model: nn.Module, image_size: int, channels: int) -> torch.fx.GraphModule:
    """`model` exported with a dynamic batch (strict: the quantizer matches layers by their source
    module) and prepared for QAT: fake quantizers in place, in train mode."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model.eval()
    example = (torch.zeros(2, channels, image_size, image_size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        exported = torch.export.export(model, example, dynamic_shapes={"x": {0: batch}}, strict=True)
    except Exception as exc:  # torch raises many types here; the message says which layer
        raise LatheError(f"cannot export the network for QAT: {type(exc).__name__}: {exc}") from exc
    with conv_bn_passes_for_present_convs():
        prepared = prepare_qat_pt2e(exported.module(), qat_quantizer())
    swap_calls(prepared, TORCH_SQRT, exact_sqrt)
    return prepared


# torchao 0.18 fuses (prepare) and folds (convert) conv-BatchNorm once per conv kind: conv1d, conv2d,
# conv_transpose1d and conv_transpose2d, each by tracing its pattern graphs with torch.export (3 graphs
# per kind to fuse, 24 to fold), ~0.25 s apiece whatever the network. Our networks have conv2d only, so
# three quarters of that tracing matches nothing: 24 s of the tiny qat stage's 45 s, measured.
# `conv_bn_passes_for_present_convs` skips the kinds absent from the graph; the INT8 model is byte for
# byte the same (the tiny reference's committed digest covers it; the real qat model kept its md5).
CONV_OPS = {F.conv1d: torch.ops.aten.conv1d, F.conv2d: torch.ops.aten.conv2d,
            F.conv_transpose1d: torch.ops.aten.conv_transpose1d, F.conv_transpose2d: torch.ops.aten.conv_transpose2d}
CONV_BN_PASSES = ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")  # in torchao.quantization.pt2e.qat_utils


def has_conv_kind(graph: torch.fx.GraphModule, conv_fn: Callable[..., Any]) -> bool:
    """Whether `graph` calls the aten op of `conv_fn` (any overload); an unknown `conv_fn` counts as present."""
    packet = CONV_OPS.get(conv_fn)
    return packet is None or any(n.op == "call_function" and getattr(n.target, "overloadpacket", None) is packet
                                 for n in graph.graph.nodes)


def skip_absent_conv_kinds(conv_bn_pass: Callable[..., torch.fx.GraphModule]) -> Callable[..., torch.fx.GraphModule]:
    """A torchao conv-BatchNorm pass, `(graph, conv_fn, ...) -> graph`, that returns the graph untouched when
    it has no conv of that kind (the pass would trace its patterns and match nothing)."""
    @functools.wraps(conv_bn_pass)
    def run_if_present(graph: torch.fx.GraphModule, conv_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return conv_bn_pass(graph, conv_fn, *args, **kwargs) if has_conv_kind(graph, conv_fn) else graph
    return run_if_present


@contextmanager
def conv_bn_passes_for_present_convs() -> Iterator[None]:
    """While in force, torchao's conv-BatchNorm fuse and fold passes skip conv kinds the graph lacks.
    Restored on exit; with a torchao that no longer has these passes, nothing is changed."""
    from torchao.quantization.pt2e import qat_utils

    originals = {name: getattr(qat_utils, name) for name in CONV_BN_PASSES if hasattr(qat_utils, name)}
    try:
        for name, original in originals.items():
            setattr(qat_utils, name, skip_absent_conv_kinds(original))
        yield
    finally:
        for name, original in originals.items():
            setattr(qat_utils, name, original)


def swap_calls(graph: torch.fx.GraphModule, old: Any, new: Any) -> int:
    """Point every call of `old` in the graph at `new` (same arguments); returns how many.

    Used for sqrt: torchao's conv-BatchNorm QAT pattern divides by BatchNorm's running std,
    `torch.sqrt(running_var + eps)`, on every forward; torch's float32 sqrt is MKL's vector math and
    its last bit depends on the CPU (lathe.determinism.exact_sqrt), which made an Intel Xeon and an AMD
    EPYC fine-tune different networks. Training runs `exact_sqrt`; `convert` puts torch's back first,
    because convert_pt2e finds the pattern by its ops (the folding itself uses rsqrt, the same everywhere)."""
    nodes = [n for n in graph.graph.nodes if n.op == "call_function" and n.target is old]
    for node in nodes:
        node.target = new
    if nodes:
        graph.recompile()
    return len(nodes)


class QatNet(nn.Module):
    """A prepared (fake-quantized) network as `fit` drives it: `train()`/`eval()` switch BatchNorm and
    dropout the exported way and turn observers on (training) and off (judging), so a val pass
    never moves the ranges the INT8 model will use."""

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> QatNet:
        from torchao.quantization.pt2e import (
            disable_observer,
            enable_observer,
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )

        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
        self.graph.apply(enable_observer if mode else disable_observer)
        self.training = mode
        return self


def convert(net: QatNet) -> torch.fx.GraphModule:
    """The fine-tuned network with BatchNorm folded and quantize/dequantize ops, in eval mode."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    net.eval()
    swap_calls(net.graph, exact_sqrt, TORCH_SQRT)
    with conv_bn_passes_for_present_convs():
        converted = convert_pt2e(net.graph)
    allow_exported_model_train_eval(converted)  # export_onnx calls .eval() (its replacement returns None)
    converted.eval()  # the exported way: moves the graph's dropout and BatchNorm ops to eval
    for module in converted.modules():  # ... and, as nn.Module.eval would, the flags torch.onnx.export reads
        module.training = False
    return converted


# ---------------------------------------------------------------------------------------------
# The ONNX model


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def quantize_biases(proto: onnx.ModelProto) -> int:
    """Replace each float bias of a Conv/Gemm whose input and weight are dequantized by int32 values and a
    DequantizeLinear (scale = input scale x weight scale per output channel, zero point 0), in place.

    Returns how many biases were quantized. A bias too large for int32 at that scale is left in float.
    """
    graph = proto.graph
    inits = _initializers(graph)
    producer = {out: n for n in graph.node for out in n.output}
    new_nodes: dict[int, onnx.NodeProto] = {}
    done = 0
    for i, node in enumerate(graph.node):
        if node.op_type not in BIAS_OPS or len(node.input) < 3 or node.input[2] not in inits:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        if dq_x.input[1] not in inits or dq_w.input[1] not in inits:
            continue
        x_scale = numpy_helper.to_array(inits[dq_x.input[1]]).astype(np.float64)
        w_scale = numpy_helper.to_array(inits[dq_w.input[1]]).astype(np.float64)
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        if x_scale.size != 1:
            continue
        scale = (x_scale.reshape(()) * w_scale).astype(np.float32)  # (out_channels,) or ()
        if not np.all(scale > 0):
            continue
        q = np.round(bias / scale.astype(np.float64))
        if np.abs(q).max(initial=0) >= 2**31 - 1:
            continue
        name = node.input[2]
        graph.initializer.remove(inits[name])
        q_name, s_name, z_name, out = f"{name}_quantized", f"{name}_scale", f"{name}_zero_point", f"{name}_dequantized"
        graph.initializer.extend([
            numpy_helper.from_array(q.astype(np.int32), q_name),
            numpy_helper.from_array(np.broadcast_to(scale, bias.shape).astype(np.float32).copy(), s_name),
            numpy_helper.from_array(np.zeros(bias.shape, np.int32), z_name),
        ])
        new_nodes[i] = onnx.helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out],
                                             name=f"{name}_DequantizeLinear", axis=0)
        node.input[2] = out
        done += 1
    # keep the graph topologically sorted: each bias's DequantizeLinear just before its consumer
    nodes = []
    for i, node in enumerate(graph.node):
        if i in new_nodes:
            nodes.append(new_nodes[i])
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return done


def drop_exporter_notes(proto: onnx.ModelProto) -> None:
    """Remove, in place, what torch.onnx stores for people reading the graph rather than for running it:
    each node's notes on the torch graph it came from (`pkg.torch.onnx.fx_node`, `name_scopes`) and the
    intermediate shapes (`value_info`, which onnxruntime infers). Measured on the ELPV student: 34 KB of a
    177 KB INT8 file; a gateway model carries weights, not debug notes."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    del proto.graph.value_info[:]


def export_qat_onnx(converted: torch.fx.GraphModule, image_size: int, channels: int,
                    metadata: dict[str, str]) -> bytes:
    """The converted network as one ONNX QDQ file with int32 biases and no exporter notes, checked."""
    proto = onnx.load_from_string(export_onnx(converted, image_size, channels, metadata))
    drop_exporter_notes(proto)
    quantize_biases(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise LatheError(f"the QAT model is not valid ONNX: {exc}") from exc
    return proto.SerializeToString()


def check_against_torch(model_bytes: bytes, converted: torch.fx.GraphModule, images: np.ndarray,
                        where: str) -> dict[str, float | int]:
    """onnxruntime's INT8 model against torch's simulation of it on (N, S, S) uint8 images; raises when
    their answers differ on more than MAX_DISAGREEMENT of the images (and more than 2) or onnxruntime
    gives non-finite logits."""
    got = predict(load_session_bytes(model_bytes), images)
    want = predict_logits(converted, torch.from_numpy(to_input(images))).numpy()
    if not np.isfinite(got).all():
        raise LatheError(f"{where}: the QAT model outputs non-finite logits")
    differ = int((got.argmax(1) != want.argmax(1)).sum())
    if differ > max(2, MAX_DISAGREEMENT * len(images)):
        raise LatheError(f"{where}: onnxruntime's INT8 model and torch's QAT simulation give different answers on "
                         f"{differ} of {len(images)} {CHECK_SPLIT} images (more than {MAX_DISAGREEMENT:.0%}): "
                         "the export is broken")
    agreement = 1 - differ / len(images)
    return {"n": int(len(images)), "argmax_agreement": round(agreement, 6),
            "max_abs_logit_diff": round(float(np.abs(got - want).max()), 4)}


def load_session_bytes(model_bytes: bytes) -> Any:
    """A one-thread onnxruntime session of in-memory model bytes (load_session reads a file)."""
    with tempfile.TemporaryDirectory(prefix="lathe-qat-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model_bytes)
        return load_session(path, threads=1)


# ---------------------------------------------------------------------------------------------
# The whole step


@dataclass(frozen=True)
class QatResult:
    """The INT8 model (one ONNX file), its training history and the record written beside it."""

    model_bytes: bytes
    fit: TrainResult
    record: dict


def qat_loss(teacher_dir: Path | None, train: dict[str, np.ndarray], cfg: QatParams, task: Task) -> Any:
    """Distillation from the teacher (alpha > 0) or weighted cross-entropy on the labels alone."""
    weights = class_weights(train["labels"], task.num_classes, cfg.class_weighting)
    if teacher_dir is None or cfg.alpha == 0:
        return cross_entropy_loss(weights, cfg.label_smoothing)
    teacher, _, _ = load_model_dir(teacher_dir, "teacher")
    logits = memoized_teacher(frozen_teacher(teacher), to_tensor(train["images"]))
    return kd_loss(logits, cfg.temperature, cfg.alpha, weights, cfg.label_smoothing)


def qat_finetune(model_dir: Path, prepared_dir: Path, cfg: QatParams, teacher_dir: Path | None = None,
                 progress: Progress | None = None) -> QatResult:
    """Fine-tune the float network in `model_dir` under simulated INT8, deterministically; nothing is written."""
    model, spec, image_size = load_model_dir(model_dir, "float model")
    gen = make_deterministic(cfg.seed, cfg.threads)
    train, val, task = load_split(prepared_dir, "train"), load_split(prepared_dir, "val"), read_task(prepared_dir)
    check_fits(spec, str(Path(model_dir) / FILES.arch), task.channels, task.num_classes)
    if image_size != task.image_size:
        raise LatheError(f"{Path(model_dir) / FILES.arch}: built for {image_size} px images "
                         f"but the prepared data is {task.image_size} px")
    check_trainable(train, val, task.num_classes)
    loss = qat_loss(teacher_dir, train, cfg, task)
    net = QatNet(prepare_qat(model, image_size, task.channels))
    result = fit(net, train, val, cfg, gen, task, loss_fn=loss, progress=progress)
    converted = convert(net)

    source_sha = sha256_file(Path(model_dir) / FILES.weights)
    teacher_sha = sha256_file(Path(teacher_dir) / FILES.weights) if teacher_dir is not None else ""
    model_bytes = export_qat_onnx(converted, image_size, task.channels,
                                  {SOURCE_SHA_KEY: source_sha, TEACHER_SHA_KEY: teacher_sha})
    check = check_against_torch(model_bytes, converted, val["images"], str(model_dir))
    proto = onnx.load_from_string(model_bytes)
    record = {
        # hashes, not paths: the record's bytes must not depend on where the stage ran
        "source": {"weights_sha256": source_sha},
        "teacher": {"weights_sha256": teacher_sha} if teacher_dir is not None else None,
        "method": "torchao PT2E QAT (prepare_qat_pt2e, X86InductorQuantizer), fine-tuned with distillation"
                  if teacher_dir and cfg.alpha > 0 else "torchao PT2E QAT (prepare_qat_pt2e, X86InductorQuantizer)",
        "quantization": {"format": "QDQ", "activations": "uint8 per tensor, affine",
                         "weights": f"int8 per channel, symmetric, {WEIGHT_QMIN}..{WEIGHT_QMAX}",
                         "biases": "int32, scale = input scale x weight scale"},
        "settings": cfg.model_dump(),
        "best_epoch": result.best_epoch,
        "best_val": {k: round(v, 6) for k, v in result.best_val.items()},
        "versions": library_versions(),
        "numerics": numerics_record(),
        "node_types": node_type_counts(proto),
        "float_compute_nodes": float_compute_nodes(proto),
        "check_vs_torch": {"split": CHECK_SPLIT, **check},
        "model_sha256": sha256_bytes(model_bytes),
        "size_bytes": len(model_bytes),
    }
    return QatResult(model_bytes, result, record)


def library_versions() -> dict[str, str]:
    import onnxruntime as ort
    import torchao

    return {"torch": torch.__version__.split("+")[0], "torchao": torchao.__version__,
            "onnx": onnx.__version__, "onnxruntime": ort.__version__}


def write_qat(out_dir: Path, result: QatResult) -> None:
    """Atomically write model.onnx and (last) qat.json into `out_dir`."""
    write_bytes(Path(out_dir) / MODEL_FILE, result.model_bytes)
    write_json(Path(out_dir) / RECORD_FILE, result.record)
