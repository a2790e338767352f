import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lathe.compress.bias_correction import (
    MEAN_BITS,
    channel_means,
    correct_conv_biases,
    correct_conv_output_means,
    quantized_convs,
    snap_nearest,
    weight_rounding_shift,
)
from lathe.compress.params import QuantizeParams
from lathe.compress.quantize import quantize_static_int8
from lathe.errors import LatheError
from lathe.measure.ort import load_session, to_input
from tests.tiny import TINY_PARAMS

SIZE = 16
CHANNELS = 8
TINY = QuantizeParams.model_validate(TINY_PARAMS["quantize"])


@pytest.mark.parametrize("groups", [1, 2, CHANNELS])
def test_weight_rounding_shift_is_the_weight_error_convolved_with_the_mean_input(groups):
    rng = np.random.default_rng(groups)
    original = rng.normal(size=(CHANNELS, CHANNELS // groups, 3, 3))
    dequantized = original + rng.normal(scale=0.01, size=original.shape)
    mean = rng.uniform(0, 2, CHANNELS)
    # a constant image per channel, no padding: every output position is exactly the shift
    image = torch.from_numpy(np.broadcast_to(mean[None, :, None, None], (1, CHANNELS, 3, 3)).copy())
    expected = torch.nn.functional.conv2d(image, torch.from_numpy(dequantized - original), groups=groups)
    got = weight_rounding_shift(dequantized, original, mean, groups)
    assert got.shape == (CHANNELS,)
    np.testing.assert_allclose(got, expected.numpy().ravel(), rtol=1e-12, atol=1e-14)


def test_snap_nearest_keeps_mean_bits_and_merges_last_bit_neighbours():
    x = np.array([0.1234567, -3.75, 1e-9, 0.0])
    snapped = snap_nearest(x)
    np.testing.assert_allclose(snapped, x, rtol=2.0**-MEAN_BITS, atol=0)
    assert snap_nearest(np.float32(0.1234567)) == snap_nearest(np.nextafter(np.float32(0.1234567), np.float32(1)))


def edge_filters(rng, shape):
    """(C, 1, 3, 3) kernels whose weights cancel: +1 at the centre, -1 at a corner and small weights
    summing to 0. The +-1 set the INT8 step (1/63), so the small weights round coarsely; on smooth
    bright images the outputs are small and that rounding shifts their mean visibly."""
    w = rng.normal(scale=0.05, size=shape)
    w -= w.mean(axis=(1, 2, 3), keepdims=True)
    w[:, :, 1, 1] += 1.0
    w[:, :, 0, 0] -= 1.0
    return w.astype(np.float32)


def edge_model(with_first_bias: bool = True) -> onnx.ModelProto:
    """x (N,1,S,S) -> Conv 1->8 3x3 -> depthwise Conv 8x 3x3 -> y, both with edge-filter weights."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(edge_filters(rng, (CHANNELS, 1, 3, 3)), "w1"),
        numpy_helper.from_array(edge_filters(rng, (CHANNELS, 1, 3, 3)), "w2"),
        # the first conv's outputs sit near 0.5: the depthwise conv, a high-pass like its input's
        # filters, then sees a large mean too (and passes the first conv's own shift on times ~0)
        numpy_helper.from_array((0.5 + rng.normal(scale=0.1, size=CHANNELS)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(scale=0.1, size=CHANNELS).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"] if with_first_bias else ["x", "w1"], ["h"], name="edges",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="depthwise", pads=[1, 1, 1, 1], group=CHANNELS),
    ]
    graph = helper.make_graph(nodes, "edges", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, CHANNELS, SIZE, SIZE])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def bright_smooth(n: int, seed: int) -> np.ndarray:
    """(N, S, S) uint8: a bright level per image with faint texture, like an EL cell's interior."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.uniform(170, 230, (n, 1, 1)) + rng.normal(0, 4, (n, SIZE, SIZE)), 0, 255).astype(np.uint8)


def interior_mean_error(model_path, quantized: bytes, images: np.ndarray, tmp_path) -> np.ndarray:
    """Per-channel mean of (int8 - float) outputs away from the zero-padded border, (C,)."""
    q_path = tmp_path / "q.onnx"
    q_path.write_bytes(quantized)
    x = to_input(images)
    f = load_session(model_path, threads=1).run(None, {"x": x})[0]
    q = load_session(q_path, threads=1).run(None, {"x": x})[0]
    return (q - f)[:, :, 2:-2, 2:-2].mean(axis=(0, 2, 3))


def test_bias_correction_cancels_the_mean_shift_of_weight_rounding_on_held_out_images(tmp_path):
    model_path = tmp_path / "edges.onnx"
    onnx.save(edge_model(), str(model_path))
    calibration, held_out = bright_smooth(64, 1), bright_smooth(64, 2)
    plain = quantize_static_int8(model_path, calibration, TINY.model_copy(update={"bias_correction": False}))
    corrected = quantize_static_int8(model_path, calibration, TINY)
    assert TINY.bias_correction  # the default
    before = np.abs(interior_mean_error(model_path, plain, held_out, tmp_path))
    after = np.abs(interior_mean_error(model_path, corrected, held_out, tmp_path))
    # measured: mean |shift| 0.016 -> 0.0012 (the rest is activation rounding and the first conv's
    # residual error reaching the second)
    assert after.mean() < 0.25 * before.mean()
    # only the int32 biases moved
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(plain).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(corrected).graph.initializer}
    moved = sorted(name for name in a if not np.array_equal(a[name], b[name]))
    assert moved and all(a[name].dtype == np.int32 for name in moved)


def test_only_convs_with_a_dequantized_weight_and_bias_are_corrected(tmp_path):
    model_path = tmp_path / "edges.onnx"
    float_model = edge_model(with_first_bias=False)
    onnx.save(float_model, str(model_path))
    images = bright_smooth(32, 1)
    qdq = onnx.load_from_string(quantize_static_int8(model_path, images, TINY.model_copy(update={"bias_correction": False})))
    assert [c.node.name for c in quantized_convs(qdq)] == ["depthwise"]
    feeds = [{"x": to_input(images)}]
    assert correct_conv_biases(qdq, float_model, feeds) == ["depthwise"]


def test_a_float_model_that_does_not_match_the_quantized_one_is_refused_naming_the_conv(tmp_path):
    model_path = tmp_path / "edges.onnx"
    onnx.save(edge_model(), str(model_path))
    images = bright_smooth(32, 1)
    qdq = onnx.load_from_string(quantize_static_int8(model_path, images, TINY.model_copy(update={"bias_correction": False})))
    other = edge_model()
    w2 = next(t for t in other.graph.initializer if t.name == "w2")
    w2.CopyFrom(numpy_helper.from_array(np.zeros((CHANNELS, 1, 5, 5), np.float32), "w2"))
    with pytest.raises(LatheError, match="'depthwise'.*float one"):
        correct_conv_biases(qdq, other, [{"x": to_input(images)}])


def conv_mean_gaps(float_model, quantized: bytes, images) -> dict[str, float]:
    """Per conv: mean over channels of |E[float output] - E[INT8 chain output]| (before activation rounding)."""
    q = onnx.load_from_string(quantized)
    float_names = {n.name: n.output[0] for n in float_model.graph.node}
    pairs = {c.node.name: (float_names[c.node.name], c.node.output[0]) for c in quantized_convs(q)}
    f = channel_means(float_model, [a for a, _ in pairs.values()], [{"x": to_input(images)}])
    got = channel_means(q, [b for _, b in pairs.values()], [{"x": to_input(images)}])
    return {name: float(np.abs(f[a] - got[b]).mean()) for name, (a, b) in pairs.items()}


def test_sequential_correction_matches_each_conv_output_mean_on_the_calibration_images(tmp_path):
    model_path = tmp_path / "edges.onnx"
    float_model = edge_model()
    onnx.save(float_model, str(model_path))
    calibration = bright_smooth(64, 1)
    weights_only = quantize_static_int8(model_path, calibration, TINY)
    both = quantize_static_int8(model_path, calibration, TINY.model_copy(update={"sequential_bias_correction": True}))
    assert not TINY.sequential_bias_correction  # off by default
    before, after = conv_mean_gaps(float_model, weights_only, calibration), conv_mean_gaps(float_model, both, calibration)
    # measured: edges 0.00058 -> 0, depthwise 0.00135 -> 0.00004
    assert sum(after.values()) < 0.5 * sum(before.values()), (before, after)
    # a fixed point: correcting again moves no bias by more than one step (a wrong sign or unit would)
    q = onnx.load_from_string(both)
    assert correct_conv_output_means(q, float_model, lambda: [{"x": to_input(calibration)}]) == ["edges", "depthwise"]
    first = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(both).graph.initializer
             if t.data_type == TensorProto.INT32}
    again = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == TensorProto.INT32}
    assert all(np.abs(again[k].astype(np.int64) - first[k]).max() <= 1 for k in first)
