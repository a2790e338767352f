import functools
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from lathe.compress.calibration import (
    CALIBRATION_BATCH,
    ImageReader,
    calibration_ids_sha256,
    calibration_indices,
    reader_for,
)
from lathe.compress.params import QuantizeParams
from lathe.compress.quant_inspect import float_compute_nodes, node_type_counts, runtime_node_types
from lathe.compress.quantize import pre_process, quantize_model, quantize_static_int8, write_quantized
from lathe.compress.quantize_baselines import ORT_STATIC_DEFAULTS, quantize_dynamic_int8, quantize_static_defaults
from lathe.data.ingest import load_split
from lathe.errors import ConfigError, DataError, LatheError
from lathe.io import read_json, save_arrays, sha256_file
from lathe.measure.ort import count_onnx_params, load_session, model_files, predict, to_input
from lathe.model.arch import build_model
from lathe.model.export import export_onnx
from lathe.model.params import ArchSpec
from tests.tiny import ROOT, TINY_PARAMS, write_tiny_task

SIZE = 16
TINY = QuantizeParams.model_validate(TINY_PARAMS["quantize"])


def synthetic(n, seed, size=SIZE):
    """(N, S, S) uint8 images and labels: class k is a brightness ramp along one of 4 directions, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    ramp = np.broadcast_to(np.linspace(-1, 1, size), (size, size))
    dirs = np.stack([ramp, -ramp, ramp.T, -ramp.T])
    level, amplitude = rng.uniform(60, 190, (n, 1, 1)), rng.uniform(20, 80, (n, 1, 1))
    img = level + amplitude * dirs[labels] + rng.normal(0, 25, (n, size, size))
    return np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64)


@functools.lru_cache(maxsize=1)
def trained_model() -> bytes:
    """A tiny residual CNN trained for a few seconds on `synthetic` (~90% accuracy), as one ONNX file.

    Trained, not random: a random net predicts one class for every input, so agreement with the
    float model would prove nothing.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend with other jobs
    try:
        torch.manual_seed(0)
        model = build_model(ArchSpec(stem_channels=4, stem_stride=1, widths=[4, 8], blocks=[1, 1]), SIZE)
        x, y = synthetic(512, 0)
        images, labels = torch.from_numpy(to_input(x)), torch.from_numpy(y)
        opt = torch.optim.Adam(model.parameters(), 0.01)
        model.train()
        for _ in range(40):
            i = torch.randint(0, len(labels), (32,))
            loss = torch.nn.functional.cross_entropy(model(images[i]), labels[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return export_onnx(model.eval(), SIZE)
    finally:
        torch.set_num_threads(threads)


def write_model(path, model_bytes=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(model_bytes or trained_model())
    return path / "model.onnx"


def write_prepared(prepared, n_train=40, n_val=24, size=SIZE):
    """train/val splits; sample ids are distinct, unsorted and not positions (as after a stratified split)."""
    ids = np.random.default_rng(7).permutation(1000)[: n_train + n_val].astype(np.int64) + 5000
    for split, n, seed, sid in (("train", n_train, 1, ids[:n_train]), ("val", n_val, 2, ids[n_train:])):
        images, labels = synthetic(n, seed, size)
        save_arrays(prepared / f"{split}.safetensors", {
            "images": images, "labels": labels, "sample_ids": sid,
        })
    return write_tiny_task(prepared, size)


def initializer(proto, name):
    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))


def weight_scales(proto):
    """Scales of the DequantizeLinear nodes that feed Conv weights."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    return [initializer(proto, producer[n.input[1]].input[1]) for n in proto.graph.node if n.op_type == "Conv"]


def activation_zero_point_types(proto):
    """Element types of the QuantizeLinear zero points (one per quantized activation)."""
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    return {inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"}


# --- calibration sample selection ---------------------------------------------------------------


def test_calibration_indices_are_seeded_sorted_and_distinct():
    a = calibration_indices(100, 10, seed=3)
    assert a.dtype == np.int64 and len(a) == 10 and len(set(a.tolist())) == 10
    assert a.tolist() == sorted(a.tolist()) and 0 <= a.min() and a.max() < 100
    np.testing.assert_array_equal(a, calibration_indices(100, 10, seed=3))
    assert not np.array_equal(a, calibration_indices(100, 10, seed=4))
    assert calibration_indices(5, 5, seed=0).tolist() == [0, 1, 2, 3, 4]


def test_calibration_larger_than_the_train_split_names_the_key_and_both_sizes():
    with pytest.raises(ConfigError, match=r"quantize\.calibration_size = 50 .*train split \(40 samples\)"):
        calibration_indices(40, 50, seed=0)


def test_calibration_ids_hash_is_the_sha256_of_the_sorted_id_lines():
    want = hashlib.sha256(b"3\n5\n12\n").hexdigest()  # what `jq -r '.calibration.sample_ids[]' | sha256sum` gives
    assert calibration_ids_sha256([12, 3, 5]) == want
    assert calibration_ids_sha256(np.array([5, 12, 3, 3])) == want
    assert calibration_ids_sha256([3, 5, 13]) != want


def test_reader_feeds_the_evaluation_preprocessing_in_fixed_batches():
    images = synthetic(CALIBRATION_BATCH + 3, 0)[0]
    reader = ImageReader("image", images)
    feeds = [reader.get_next() for _ in range(len(reader))]
    assert reader.get_next() is None and len(feeds) == 2
    assert [f["image"].shape for f in feeds] == [(CALIBRATION_BATCH, 1, SIZE, SIZE), (3, 1, SIZE, SIZE)]
    np.testing.assert_array_equal(np.concatenate([f["image"] for f in feeds]), to_input(images))
    reader.rewind()
    assert reader.get_next()["image"].dtype == np.float32


# --- static quantization ------------------------------------------------------------------------


def test_static_int8_is_byte_identical_across_runs_and_processes(tmp_path):
    src = write_model(tmp_path / "m")
    images = synthetic(20, 5)[0]
    first = quantize_static_int8(src, images, TINY)
    assert quantize_static_int8(src, images, TINY, workdir=tmp_path) == first
    # A fresh interpreter with another hash seed: no set/dict-order or temp-name leaks into the bytes.
    npy = tmp_path / "images.npy"
    np.save(npy, images)
    code = ("import sys, numpy as np; from pathlib import Path; from lathe.compress.params import QuantizeParams; "
            "from lathe.compress.quantize import quantize_static_int8; "
            f"sys.stdout.buffer.write(quantize_static_int8(Path({str(src)!r}), np.load({str(npy)!r}), "
            f"QuantizeParams.model_validate({TINY.model_dump()!r})))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "ORT_DISABLE_TELEMETRY": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, check=True)
    assert out.stdout == first


def test_static_int8_is_qdq_with_the_configured_types_and_nothing_left_float(tmp_path):
    src = write_model(tmp_path / "m")
    images = synthetic(16, 5)[0]
    q = onnx.load_from_string(quantize_static_int8(src, images, TINY))
    counts = node_type_counts(q)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    assert counts["Conv"] == 6 and float_compute_nodes(q) == []  # stem + 2 blocks x 2 + 1 projection
    assert activation_zero_point_types(q) == {TensorProto.UINT8}  # quint8 activations (the default)
    assert all(s.ndim == 1 and s.size > 1 for s in weight_scales(q))  # per-channel weights
    assert any(t.data_type == TensorProto.INT8 for t in q.graph.initializer)
    assert count_onnx_params(q) == count_onnx_params(onnx.load_from_string(trained_model()))
    assert {p.key for p in q.metadata_props} >= {"onnx.quant.pre_process"}
    q8 = onnx.load_from_string(quantize_static_int8(src, images, TINY.model_copy(update={
        "activation_type": "qint8", "per_channel": False})))
    assert activation_zero_point_types(q8) == {TensorProto.INT8}
    assert all(s.ndim == 0 for s in weight_scales(q8))


def test_quantized_model_runs_and_agrees_with_float_on_held_out_images(tmp_path):
    src = write_model(tmp_path / "m")
    (tmp_path / "q.onnx").write_bytes(quantize_static_int8(src, synthetic(16, 10)[0], TINY))
    images, labels = synthetic(200, 100)
    f = predict(load_session(src, threads=1), images)
    q = predict(load_session(tmp_path / "q.onnx", threads=1), images)
    assert np.isfinite(q).all()
    acc_f, acc_q = (f.argmax(1) == labels).mean(), (q.argmax(1) == labels).mean()
    assert acc_f >= 0.75 and len(np.unique(f.argmax(1))) == 4  # a float model worth comparing against
    assert (f.argmax(1) == q.argmax(1)).mean() >= 0.9  # measured 1.0
    assert acc_q >= acc_f - 0.05  # measured 0.95 both
    # Typical logit error, relative to the logit range (measured: median 0.003, p95 0.03; the max,
    # 0.14, is an image outside the 16 calibration images' range, where activations clip).
    assert np.median(np.abs(q - f)) <= 0.02 * np.ptp(f)


def test_own_minmax_calibration_matches_quantize_static_calibrating_itself_up_to_the_snapped_ranges(tmp_path):
    """Same weights bit for bit; activation scales at most 2^-RANGE_BITS wider (lathe.compress.quantize.snap_outward)."""
    from onnx import numpy_helper

    from lathe.compress.quantize import RANGE_BITS

    src = write_model(tmp_path / "m")
    images = synthetic(40, 5)[0]  # 32 + 8: two collect_data calls on our side, one on theirs
    # bias correction (on by default; tests/lathe/compress/test_bias_correction.py) moves biases on purpose
    ours = onnx.load_from_string(quantize_static_int8(src, images, TINY.model_copy(update={"bias_correction": False})))
    pre_process(src, tmp_path / "pre.onnx")
    quantize_static(str(tmp_path / "pre.onnx"), str(tmp_path / "ref.onnx"), reader_for(src, images),
                    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    ref = onnx.load(str(tmp_path / "ref.onnx"))
    a = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    assert sorted(a) == sorted(b)
    wider = 0
    for name in a:
        if a[name].dtype == np.float32 and name.endswith("_scale"):
            assert np.all(a[name] >= b[name]) and np.allclose(a[name], b[name], rtol=2.0 ** (1 - RANGE_BITS), atol=0)
            wider += int(np.any(a[name] > b[name]))
        elif a[name].dtype == np.uint8:  # activation zero points may move by one step
            assert np.abs(a[name].astype(int) - b[name].astype(int)).max() <= 1
        elif a[name].dtype == np.int32:  # biases, quantized with input scale x weight scale
            d = np.abs(a[name].astype(np.int64) - b[name].astype(np.int64))
            assert np.all(d <= np.maximum(1, np.abs(b[name]) * 2.0 ** (1 - RANGE_BITS))), name
        else:
            assert np.array_equal(a[name], b[name]), name
    assert wider > 0  # the snapping did something


def test_snap_outward_widens_by_at_most_the_grid_and_merges_last_bit_neighbours():
    from lathe.compress.quantize import RANGE_BITS, snap_outward

    rng = np.random.default_rng(0)
    v = (rng.standard_normal(1000) * 10).astype(np.float32)
    hi, lo = snap_outward(v, up=True), snap_outward(v, up=False)
    assert hi.dtype == np.float32 and np.all(hi >= v) and np.all(lo <= v)
    assert np.all(np.abs(hi - v) <= np.abs(v) * 2.0 ** (1 - RANGE_BITS))
    neighbours = np.nextafter(v, np.float32(np.inf))  # one ulp up, as another CPU's kernel may give
    assert np.mean(snap_outward(neighbours, up=True) == hi) > 0.99
    assert snap_outward(np.float32(0.0), up=True) == 0


def test_entropy_and_percentile_calibrate_differently_from_minmax(tmp_path):
    src = write_model(tmp_path / "m")
    images = synthetic(32, 5)[0]
    fast = {"histogram_bins": 256}  # onnxruntime's entropy search is pure Python; 2048 bins take ~1 s per tensor
    minmax = quantize_static_int8(src, images, TINY)
    entropy = quantize_static_int8(src, images, TINY.model_copy(update={"method": "entropy", **fast}))
    percentile = quantize_static_int8(src, images, TINY.model_copy(update={"method": "percentile", **fast}))
    assert len({minmax, entropy, percentile}) == 3
    scale = lambda b: float(initializer(onnx.load_from_string(b), "image_scale"))  # noqa: E731
    # The input image spans [0, 1] in 256 steps: MinMax covers it all, percentile (99.999) very nearly.
    assert scale(minmax) >= scale(percentile) > 0.9 * scale(minmax)
    assert np.isfinite(predict(load_session(write_model(tmp_path / "e", entropy), 1), images)).all()


def test_a_max_pool_network_quantizes_to_an_integer_max_pool(tmp_path):
    torch.manual_seed(0)
    model = build_model(ArchSpec(stem_channels=4, stem_stride=1, widths=[4, 8], blocks=[1, 1], pool="max"), SIZE)
    src = write_model(tmp_path / "m", export_onnx(model.eval(), SIZE))
    q = quantize_static_int8(src, synthetic(16, 5)[0], TINY)
    assert float_compute_nodes(onnx.load_from_string(q)) == []
    ran = runtime_node_types(q)
    assert ran.get("com.microsoft.NhwcMaxPool") == 1 and ran.get("com.microsoft.QLinearConv") == 6
    assert not {"MaxPool", "Conv", "Gemm"} & set(ran)


def test_quint8_activations_fuse_every_conv_in_onnxruntime(tmp_path):
    src = write_model(tmp_path / "m")
    images = synthetic(16, 5)[0]
    fused = runtime_node_types(quantize_static_int8(src, images, TINY))
    assert fused.get("com.microsoft.QLinearConv") == 6 and "Conv" not in fused
    q8 = runtime_node_types(quantize_static_int8(src, images, TINY.model_copy(update={"activation_type": "qint8"})))
    # How many int8-activation convs onnxruntime fuses depends on the CPU (measured here: 2 of 6).
    assert q8.get("com.microsoft.QLinearConv", 0) + q8.get("Conv", 0) == 6


# --- the whole step -----------------------------------------------------------------------------


def test_quantize_model_records_lineage_and_writes_one_self_contained_file(tmp_path):
    write_model(tmp_path / "m")
    prepared = write_prepared(tmp_path / "prep")
    result = quantize_model(tmp_path / "m", prepared, TINY)
    write_quantized(tmp_path / "out", result)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "quantize.json"]
    assert model_files(out / "model.onnx") == [out / "model.onnx"]
    rec = read_json(out / "quantize.json")
    assert rec == result.record and (out / "model.onnx").read_bytes() == result.model_bytes
    cal = rec["calibration"]
    assert set(cal["sample_ids"]) <= set(load_split(prepared, "train")["sample_ids"].tolist())
    assert cal["size"] == len(cal["sample_ids"]) == 8 and cal["sample_ids"] == sorted(cal["sample_ids"])
    assert cal["sample_ids_sha256"] == hashlib.sha256("".join(f"{i}\n" for i in cal["sample_ids"]).encode()).hexdigest()
    assert rec["source"]["sha256"] == sha256_file(tmp_path / "m" / "model.onnx")
    assert rec["model_sha256"] == sha256_file(out / "model.onnx") and rec["size_bytes"] == len(result.model_bytes)
    quant = rec["quantization"]
    assert (cal["method"], quant["activation_type"], quant["per_channel"]) == ("minmax", "quint8", True)
    assert quant["format"] == "QDQ" and quant["quant_pre_process"] and quant["bias_correction"] is True
    assert rec["node_types"]["Conv"] == 6 and rec["float_compute_nodes"] == []
    assert rec["check_vs_float"]["n"] == 24 and rec["check_vs_float"]["argmax_agreement"] >= 0.9
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert meta["lathe.quantize.calibration_ids_sha256"] == cal["sample_ids_sha256"]
    assert meta["lathe.quantize.source_sha256"] == rec["source"]["sha256"]
    assert json.loads((out / "quantize.json").read_text())["versions"]["onnxruntime"]
    # same inputs, same bytes; another seed, other samples
    assert quantize_model(tmp_path / "m", prepared, TINY).model_bytes == result.model_bytes
    other = quantize_model(tmp_path / "m", prepared, TINY.model_copy(update={"seed": 1})).record["calibration"]
    assert other["sample_ids"] != cal["sample_ids"]


# --- baselines for the bench --------------------------------------------------------------------


def test_static_defaults_are_per_tensor_int8_without_pre_processing(tmp_path):
    src = write_model(tmp_path / "m")
    q = onnx.load_from_string(quantize_static_defaults(src, synthetic(16, 5)[0]))
    assert ORT_STATIC_DEFAULTS["activation_type"] == "qint8" and not ORT_STATIC_DEFAULTS["per_channel"]
    assert activation_zero_point_types(q) == {TensorProto.INT8}
    assert all(s.ndim == 0 for s in weight_scales(q))
    assert "onnx.quant.pre_process" not in {p.key for p in q.metadata_props}


def test_dynamic_int8_uses_integer_convs_and_runs(tmp_path):
    src = write_model(tmp_path / "m")
    data = quantize_dynamic_int8(src)
    counts = node_type_counts(onnx.load_from_string(data))
    assert counts.get("ConvInteger") == 6 and "QuantizeLinear" not in counts
    images = synthetic(8, 3)[0]
    assert np.isfinite(predict(load_session(write_model(tmp_path / "d", data), 1), images)).all()


# --- failures -----------------------------------------------------------------------------------


def test_missing_model_names_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(LatheError, match=r"m/model\.onnx: model file not found"):
        quantize_model(tmp_path / "m", write_prepared(tmp_path / "prep"), TINY)


def test_corrupt_model_names_the_file(tmp_path):
    write_model(tmp_path / "m", b"\x08\x07 not a model")
    with pytest.raises(LatheError, match=r"m/model\.onnx: not a readable ONNX model"):
        quantize_model(tmp_path / "m", write_prepared(tmp_path / "prep"), TINY)


def test_external_data_is_refused_naming_both_files(tmp_path):
    (tmp_path / "m").mkdir()
    onnx.save_model(onnx.load_from_string(trained_model()), str(tmp_path / "m" / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=64)
    with pytest.raises(LatheError, match=r"model\.onnx: weights are stored in external data .*model\.onnx\.data"):
        quantize_model(tmp_path / "m", write_prepared(tmp_path / "prep"), TINY)


def test_calibration_size_above_the_train_split_is_a_config_error(tmp_path):
    write_model(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"quantize\.calibration_size = 41 .*\(40 samples\)"):
        quantize_model(tmp_path / "m", write_prepared(tmp_path / "prep"),
                       TINY.model_copy(update={"calibration_size": 41}))


def test_image_size_mismatch_names_the_model_and_the_split(tmp_path):
    write_model(tmp_path / "m")
    with pytest.raises(LatheError, match=r"model\.onnx.*16x16.*train\.safetensors.*24x24"):
        quantize_model(tmp_path / "m", write_prepared(tmp_path / "prep", size=24), TINY)


def test_missing_train_split_names_the_file(tmp_path):
    write_model(tmp_path / "m")
    (tmp_path / "prep").mkdir()
    with pytest.raises(DataError, match=r"prep/train\.safetensors: prepared split not found"):
        quantize_model(tmp_path / "m", tmp_path / "prep", TINY)


def test_unsupported_type_pair_is_refused_at_config_time():
    with pytest.raises(ValueError, match="weight_type qint8"):
        QuantizeParams(activation_type="qint8", weight_type="quint8")
