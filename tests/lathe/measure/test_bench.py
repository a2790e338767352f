import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from bench import run as bench_run
from lathe.errors import LatheError
from lathe.io import save_arrays
from lathe.measure.bench import ROW_KEYS, BenchModel, acceptance_check, bench_rows
from lathe.measure.bench_baselines import build_baselines, calibration_subset, describe_pruned_baseline
from lathe.measure.bench_report import bench_markdown
from lathe.measure.bench_timing import (
    int8_matmul_model,
    int8_matmul_throughput,
    interleaved_latency,
    physical_floor,
)
from lathe.measure.ort import load_session
from lathe.measure.params import BenchParams
from tests.lathe.measure.test_evaluate import SIZE, tiny_model, write_test_split
from tests.tiny import tiny_params

CFG = BenchParams()  # targets: >= 25x size, >= 5x p50, <= 1 pt accuracy and recall drop


def conv_model(size=SIZE, channels=3):
    """(N,1,S,S) -> Conv 1->C k3 -> Relu -> full-window AveragePool -> Flatten -> Gemm C->4: a second tiny model."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((4, channels)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(4, np.float32), "fb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[size, size]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, size, size])
    graph = helper.make_graph(nodes, "conv", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def row(name, role, size_bytes, accuracy, recall, p50, params=1000, macs=10_000):
    return {"name": name, "role": role, "size_bytes": size_bytes, "accuracy": accuracy, "defective_recall": recall,
            "latency_p50_ms": p50, "latency_p95_ms": p50 * 1.2, "params": params, "macs": macs}


def plant_rows():
    """The DESIGN's calibration numbers plus what the baselines roughly do on this machine."""
    return [
        row("teacher", "teacher", 4_950_000, 0.715, 0.62, 1.27, 1_200_000, 40_000_000),
        row("quantized/student", "pipeline", 173_000, 0.729, 0.63, 0.17, 115_000, 6_000_000),
        row("ort_dynamic_int8", "baseline", 1_300_000, 0.69, 0.61, 5.0, 1_200_000, 40_000_000),
        row("ort_static_int8_defaults", "baseline", 1_320_000, 0.70, 0.60, 2.0, 1_200_000, 40_000_000),
        row("pruned50_finetune", "baseline", 1_650_000, 0.70, 0.60, 0.7, 400_000, 20_000_000),
    ]


def verdicts(acc):
    return {c["name"]: c["passed"] for c in acc["criteria"]}


# --- timing ---------------------------------------------------------------------------------------


def test_interleaved_latency_times_every_model(tmp_path):
    (tmp_path / "a.onnx").write_bytes(conv_model().SerializeToString())
    (tmp_path / "b.onnx").write_bytes(tiny_model()[1])
    sessions = {n: load_session(tmp_path / f"{n}.onnx", threads=1) for n in ("a", "b")}
    out = interleaved_latency(sessions, SIZE, warmup=3, runs=20)
    assert list(out) == ["a", "b"]
    for p50, p95 in out.values():
        assert 0 < p50 <= p95


class FakeSession:
    """Records the order of calls; quacks like an InferenceSession for timing."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def get_inputs(self):
        return [type("I", (), {"name": "x", "shape": ["batch", 1, 4, 4], "type": "tensor(float)"})()]

    def run(self, _outputs, feed):
        assert feed["x"].shape == (1, 1, 4, 4)
        self.log.append(self.name)


def test_interleaving_rotates_the_order_each_round():
    calls = []
    sessions = {n: FakeSession(n, calls) for n in "abc"}
    interleaved_latency(sessions, 4, warmup=1, runs=3)
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert rounds == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_interleaving_refuses_nothing_to_time():
    with pytest.raises(LatheError, match="no models"):
        interleaved_latency({}, 4, 1, 1)


def test_int8_matmul_probe_is_valid_and_correct():
    model = int8_matmul_model(8, 16, 4)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).integers(0, 256, (8, 16), dtype=np.uint8)
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(sess.run(None, {"a": a})[0], a.astype(np.int32) @ w.astype(np.int32))
    assert int8_matmul_throughput(threads=1, shapes=[(64, 64, 64)], repeats=5, warmup=1) > 0


# --- floor, rows, schema ----------------------------------------------------------------------


def test_physical_floor_is_one_byte_per_param_and_macs_at_the_measured_rate():
    f = physical_floor(params=115_000, macs=6_000_000, int8_macs_per_s=2e11)
    assert f == {"params": 115_000, "macs": 6_000_000, "int8_param_bytes": 115_000, "latency_ms": 0.03}
    with pytest.raises(LatheError, match="positive"):
        physical_floor(1, 1, 0.0)


def test_bench_rows_carry_exactly_the_specified_keys():
    models = [BenchModel("teacher", "teacher", Path("t.onnx")), BenchModel("q", "pipeline", Path("q.onnx"))]
    stats = {n: {"size_bytes": 100, "params": 10, "macs": 1000} for n in ("teacher", "q")}
    quality = {n: {"accuracy": 0.5, "defective_recall": 0.25} for n in ("teacher", "q")}
    rows = bench_rows(models, stats, quality, {"teacher": (1.23456, 2.0), "q": (0.5, 0.6)})
    assert [list(r) for r in rows] == [list(ROW_KEYS)] * 2
    assert ROW_KEYS == ("name", "role", "size_bytes", "accuracy", "defective_recall", "latency_p50_ms",
                        "latency_p95_ms", "params", "macs")
    assert rows[0]["latency_p50_ms"] == 1.2346 and rows[1]["role"] == "pipeline"
    with pytest.raises(LatheError, match="role 'student'"):
        bench_rows([BenchModel("s", "student", Path("s.onnx"))], stats | {"s": stats["q"]},
                   quality | {"s": quality["q"]}, {"s": (1.0, 1.0)})


def test_calibration_subset_is_seeded_and_capped():
    images = np.arange(50 * 4, dtype=np.uint8).reshape(50, 2, 2)
    a, b = calibration_subset(images, 8, seed=0), calibration_subset(images, 8, seed=0)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 8 and not np.array_equal(a, calibration_subset(images, 8, seed=1))
    with pytest.raises(LatheError, match="50"):
        calibration_subset(images, 500, seed=0)


def test_calibration_subset_is_the_quantize_stages_and_survives_without_it(monkeypatch):
    from lathe.compress.calibration import calibration_indices

    images = np.arange(50 * 4, dtype=np.uint8).reshape(50, 2, 2)
    np.testing.assert_array_equal(calibration_subset(images, 8, 3), images[calibration_indices(50, 8, 3)])
    monkeypatch.setitem(sys.modules, "lathe.compress.calibration", None)  # as if the module did not exist: ImportError
    np.testing.assert_array_equal(calibration_subset(images, 8, 3), images[calibration_indices(50, 8, 3)])


def test_baselines_build_with_lathe_quantize_or_plain_onnxruntime(tmp_path, monkeypatch):
    (tmp_path / "teacher.onnx").write_bytes(tiny_model()[1])
    calibration = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE), dtype=np.uint8)
    for label in ("lathe_quantize", "fallback"):
        if label == "fallback":
            monkeypatch.setitem(sys.modules, "lathe.compress.quantize_baselines", None)
        models = build_baselines(tmp_path / "teacher.onnx", tmp_path / label, calibration)
        assert [(m.name, m.role) for m in models] == [("ort_dynamic_int8", "baseline"),
                                                      ("ort_static_int8_defaults", "baseline")]
        ops = {m.name: {n.op_type for n in onnx.load(str(m.onnx_path)).graph.node} for m in models}
        assert "ConvInteger" in ops["ort_dynamic_int8"] or "DynamicQuantizeLinear" in ops["ort_dynamic_int8"]
        assert "QuantizeLinear" in ops["ort_static_int8_defaults"]
        assert "4 seeded train images" in models[1].origin


def test_pruned_baseline_is_checked_against_its_prune_record(tmp_path):
    origin, note = describe_pruned_baseline(tmp_path)
    assert note is None and "taken on trust" in origin
    (tmp_path / "prune.json").write_text(json.dumps({"target": "channels", "ratio": 0.5, "channels_removed": 0.5}))
    origin, note = describe_pruned_baseline(tmp_path)
    assert note is None and "target channels, ratio 0.5, 50.0% of channels removed" in origin
    (tmp_path / "prune.json").write_text(json.dumps({"target": "macs", "ratio": 0.5, "channels_removed": 0.31}))
    assert "says target=macs, ratio=0.5, not 50% of channels" in describe_pruned_baseline(tmp_path)[1]
    (tmp_path / "prune.json").write_text("{")
    assert "unreadable" in describe_pruned_baseline(tmp_path)[1]


# --- acceptance ---------------------------------------------------------------------------------


def test_acceptance_passes_when_every_target_is_met():
    acc = acceptance_check(plant_rows(), CFG)
    assert acc["variant"] == "quantized/student" and acc["teacher"] == "teacher"
    assert acc["passed"] and all(verdicts(acc).values())
    values = {c["name"]: c["value"] for c in acc["criteria"]}
    assert values["size_ratio"] == round(4_950_000 / 173_000, 4) and values["latency_ratio"] == round(1.27 / 0.17, 4)
    assert values["accuracy_drop_pt"] == pytest.approx(-1.4)


def test_acceptance_fails_each_criterion_on_its_own():
    rows = plant_rows()
    rows[1] |= {"size_bytes": 250_000, "accuracy": 0.700}  # 19.8x, 1.5 pt accuracy drop
    v = verdicts(acceptance_check(rows, CFG))
    assert v == {"size_ratio": False, "latency_ratio": True, "accuracy_drop_pt": False,
                 "defective_recall_drop_pt": True, "beats_every_baseline": True}
    rows = plant_rows()
    rows[1] |= {"latency_p50_ms": 0.3, "defective_recall": 0.605}  # 4.2x, 1.5 pt recall drop
    v = verdicts(acceptance_check(rows, CFG))
    assert not v["latency_ratio"] and not v["defective_recall_drop_pt"] and v["size_ratio"]


def test_targets_are_inclusive_at_the_boundary():
    rows = plant_rows()
    rows[1] |= {"size_bytes": 4_950_000 / 25, "latency_p50_ms": 1.27 / 5, "accuracy": 0.705, "defective_recall": 0.61}
    acc = acceptance_check(rows, CFG)
    assert acc["passed"], acc["criteria"]


def test_a_baseline_as_good_or_more_accurate_fails_the_beat_criterion_and_is_named():
    rows = plant_rows()
    rows[4] |= {"size_bytes": 170_000, "latency_p50_ms": 0.1, "accuracy": 0.80}  # a magic pruned baseline
    acc = acceptance_check(rows, CFG)
    beat = next(c for c in acc["criteria"] if c["name"] == "beats_every_baseline")
    assert not beat["passed"] and not acc["passed"]
    assert "pruned50_finetune (not better on size, p50 latency, accuracy)" in beat["detail"]
    rows[4] |= {"size_bytes": 173_000, "latency_p50_ms": 0.5, "accuracy": 0.70}  # equal size is not smaller
    assert "not better on size)" in next(c for c in acceptance_check(rows, CFG)["criteria"]
                                         if c["name"] == "beats_every_baseline")["detail"]


def test_no_baseline_measured_is_a_fail_not_a_vacuous_pass():
    acc = acceptance_check(plant_rows()[:2], CFG)
    assert not verdicts(acc)["beats_every_baseline"] and not acc["passed"]


def test_the_best_pipeline_variant_is_judged():
    rows = plant_rows() + [row("quantized/teacher", "pipeline", 1_300_000, 0.716, 0.62, 0.9)]
    acc = acceptance_check(rows, CFG)
    assert acc["variant"] == "quantized/student"
    assert acc["candidates"] == {"quantized/student": 5, "quantized/teacher": 2}


def test_no_pipeline_or_no_teacher_fails_with_a_reason():
    acc = acceptance_check([r for r in plant_rows() if r["role"] != "pipeline"], CFG)
    assert acc["variant"] is None and not acc["passed"] and "no pipeline" in acc["criteria"][0]["detail"]
    acc = acceptance_check(plant_rows()[1:], CFG)
    assert acc["teacher"] is None and "one teacher" in acc["criteria"][0]["detail"]


# --- report ---------------------------------------------------------------------------------------


def synthetic_report(rows):
    rate = 2e11
    return {
        "rows": rows,
        "floor": {"int8_macs_per_s": rate, "op": "MatMulInteger", "threads": 1, "matmul_shapes": [[64, 64, 64]],
                  "matmul_repeats": 50,
                  "models": {r["name"]: physical_floor(r["params"], r["macs"], rate) for r in rows}},
        "acceptance": acceptance_check(rows, CFG),
        "setup": {"machine": {"cpu": "test cpu", "logical_cpus": 2, "platform": "linux", "python": "3.11",
                              "onnxruntime": "1.31"},
                  "threads": 1, "warmup": 50, "runs": 300, "batch": 1, "prepared_dir": "data/prepared",
                  "test_samples": 654, "image_size": 64, "defective_classes": ["probably_defective", "defective"],
                  "origins": {r["name"]: "made somehow" for r in rows}, "notes": ["pruned baseline skipped"]},
    }


def test_markdown_states_table_floor_and_pass_fail_per_criterion():
    md = bench_markdown(synthetic_report(plant_rows()))
    assert "| quantized/student | pipeline | 173.0 KB | 28.6x smaller | 72.9% | 63.0% | 0.170 ms |" in md
    assert "| teacher | teacher | 4.95 MB | - |" in md
    assert "**200.0 GMAC/s**" in md and "| 115.0 KB | 0.030 ms |" in md  # student floor: 115k params, 6M MACs
    assert "## Acceptance: quantized/student vs teacher" in md
    for name in ("size_ratio", "latency_ratio", "accuracy_drop_pt", "defective_recall_drop_pt", "beats_every_baseline"):
        assert f"| {name} |" in md
    assert md.count("| PASS |") == 5 and "Overall: **PASS**" in md
    assert "- pruned baseline skipped" in md
    # which measurement this is, and that the evaluate stage's (compare.md, model cards) is another
    assert ("Latency: `make bench`: onnxruntime CPU, batch 1, 1 thread, p50/p95 of 300 calls after 50 warm-up calls, "
            "all models interleaved round-robin in one process") in md
    assert "reports/compare.md and the model cards quote the evaluate stage's" in md


def test_markdown_shows_fail_and_a_missing_pipeline():
    rows = plant_rows()
    rows[1]["accuracy"] = 0.6
    md = bench_markdown(synthetic_report(rows))
    assert "| accuracy_drop_pt | 11.50 pt (+11.50 pt (single figures, no interval)) | <= 1 pt | FAIL |" in md and "Overall: **FAIL**" in md
    md = bench_markdown(synthetic_report([r for r in plant_rows() if r["role"] != "pipeline"]))
    assert "**FAIL**: no pipeline INT8 variant was measured" in md


# --- bench/run.py end to end on tiny models -----------------------------------------------------


def make_bench_workspace(tmp_path, pruned=False, qat=False):
    teacher = tmp_path / "models" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "model.onnx").write_bytes(tiny_model()[1])
    # the pipeline's INT8 variant: static QDQ with quint8 activations, as the quantize stage makes it
    quant_pre_process(str(teacher / "model.onnx"), str(tmp_path / "pre.onnx"))
    feeds = iter([{"image": np.random.default_rng(i).random((1, 1, SIZE, SIZE), dtype=np.float32)} for i in range(4)])
    reader = type("R", (), {"get_next": lambda self: next(feeds, None)})()
    (tmp_path / "models" / "quantized" / "teacher").mkdir(parents=True)
    quantize_static(str(tmp_path / "pre.onnx"), str(tmp_path / "models" / "quantized" / "teacher" / "model.onnx"),
                    reader, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    if qat:  # the qat stage's folder; a copy of the PTQ model stands in (QAT itself: tests/lathe/compress/test_qat.py)
        (tmp_path / "models" / "qat" / "teacher").mkdir(parents=True)
        shutil.copy(tmp_path / "models" / "quantized" / "teacher" / "model.onnx", tmp_path / "models" / "qat" / "teacher")
    if pruned:
        (tmp_path / "models" / "pruned_50").mkdir()
        (tmp_path / "models" / "pruned_50" / "model.onnx").write_bytes(conv_model().SerializeToString())
    prepared = write_test_split(tmp_path / "data" / "prepared", n=16)
    rng = np.random.default_rng(3)
    save_arrays(prepared / "train.safetensors", {
        "images": rng.integers(0, 256, (20, SIZE, SIZE), dtype=np.uint8), "labels": np.arange(20) % 4,
        "sample_ids": np.arange(20, dtype=np.int64),
    })
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(bench={"warmup": 2, "matmul_repeats": 5})))
    return tmp_path


def run_bench_cli(ws, *extra):
    bench_run.main(["--teacher", str(ws / "models/teacher"), "--quantized", str(ws / "models/quantized"),
                    "--qat", str(ws / "models/qat"), "--pruned-baseline", str(ws / "models/pruned_50"), "--prepared", str(ws / "data/prepared"),
                    "--out", str(ws / "reports"), "--params", str(ws / "params.yaml"), *extra])


def test_bench_cli_writes_json_and_markdown(tmp_path, capsys):
    ws = make_bench_workspace(tmp_path, pruned=True, qat=True)
    run_bench_cli(ws, "--work", str(ws / "work"))
    report = json.loads((ws / "reports" / "bench.json").read_text())
    assert {"rows", "floor", "qat_vs_ptq"} <= set(report)
    assert [(r["name"], r["role"]) for r in report["rows"]] == [
        ("teacher", "teacher"), ("quantized/teacher", "pipeline"), ("qat/teacher", "pipeline"),
        ("ort_dynamic_int8", "baseline"), ("ort_static_int8_defaults", "baseline"), ("pruned50_finetune", "baseline")]
    for r in report["rows"]:
        # write_json sorts keys; the set is exactly the specified one, the intervals, and the pipeline rows'
        # paired comparisons
        assert list(r) == sorted([*ROW_KEYS, "ci95", *(["paired"] if r["role"] == "pipeline" else [])])
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["defective_recall"] <= 1
        for metric in ("accuracy", "defective_recall"):
            assert r["ci95"][metric][0] <= r[metric] <= r["ci95"][metric][1], (r["name"], metric)
        assert 0 < r["latency_p50_ms"] <= r["latency_p95_ms"] and r["size_bytes"] > 0 and r["macs"] > 0
    # the same INT8 model under both names: QAT minus PTQ is exactly nothing
    [pair] = report["qat_vs_ptq"]
    assert (pair["qat"], pair["ptq"]) == ("qat/teacher", "quantized/teacher")
    assert pair["paired"]["accuracy"] == {"diff_pt": 0.0, "ci95_pt": [0.0, 0.0], "p_value": 1.0}
    teacher, pipeline = report["rows"][0], report["rows"][1]
    vs_teacher = pipeline["paired"]["teacher"]["accuracy"]
    assert vs_teacher["ci95_pt"][0] <= vs_teacher["diff_pt"] <= vs_teacher["ci95_pt"][1]
    assert vs_teacher["diff_pt"] == pytest.approx(100 * (pipeline["accuracy"] - teacher["accuracy"]), abs=1e-3)
    assert set(pipeline["paired"]) == {"teacher", "ort_dynamic_int8", "ort_static_int8_defaults", "pruned50_finetune"}
    # (no size comparison: at this toy size the QDQ scales outweigh the int8 savings)
    assert pipeline["params"] == teacher["params"] and pipeline["macs"] == teacher["macs"]
    assert report["floor"]["int8_macs_per_s"] > 0
    assert report["floor"]["models"]["teacher"]["int8_param_bytes"] == teacher["params"]
    assert math.isclose(report["floor"]["models"]["teacher"]["latency_ms"],
                        1000 * teacher["macs"] / report["floor"]["int8_macs_per_s"], rel_tol=1e-3)
    # the two pipeline names hold the same model: which one is judged is down to the timing noise
    judged = report["acceptance"]["variant"]
    assert report["setup"]["runs"] == 300 and judged in ("quantized/teacher", "qat/teacher")
    assert (ws / "work" / "ort_static_int8_defaults" / "model.onnx").is_file()
    md = (ws / "reports" / "bench.md").read_text()
    assert md.count("| PASS |") + md.count("| FAIL |") == 5
    assert "## Quantization-aware (QAT) against post-training (PTQ) INT8" in md
    assert "| qat/teacher vs quantized/teacher |" in md and "+0.0 pt (+0.0, +0.0) p=1" in md
    out = capsys.readouterr().out
    assert f"acceptance of {judged} vs teacher" in out


def test_bench_cli_notes_a_missing_pruned_baseline(tmp_path, capsys):
    ws = make_bench_workspace(tmp_path, pruned=False)
    run_bench_cli(ws)
    report = json.loads((ws / "reports" / "bench.json").read_text())
    assert "pruned50_finetune" not in {r["name"] for r in report["rows"]}
    err = capsys.readouterr().err
    assert "NOTE: baseline pruned50_finetune skipped" in err and "pruned_50/model.onnx not found" in err
    assert "pruned50_finetune skipped" in (ws / "reports" / "bench.md").read_text()
    assert "no QAT variants" in err and report["qat_vs_ptq"] == []


def test_bench_cli_missing_teacher_exits_1_naming_the_file(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    with pytest.raises(SystemExit) as exit_info:
        run_bench_cli(tmp_path)
    assert exit_info.value.code == 1
    assert "teacher/model.onnx: teacher model not found" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def test_bench_params_insist_on_300_runs(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(bench={"runs": 50})))
    with pytest.raises(SystemExit):
        run_bench_cli(tmp_path)
    assert "bench.runs" in capsys.readouterr().err


def test_a_drop_within_one_point_fails_when_its_paired_interval_reaches_past_one_point():
    rows = plant_rows()
    pipeline = next(r for r in rows if r["role"] == "pipeline")
    teacher = next(r for r in rows if r["role"] == "teacher")
    pipeline["accuracy"] = teacher["accuracy"] - 0.005  # half a point: passes on single figures
    assert verdicts(acceptance_check(rows, CFG))["accuracy_drop_pt"]
    pipeline["paired"] = {"teacher": {"accuracy": {"diff_pt": -0.5, "ci95_pt": [-2.1, 1.0], "p_value": 0.5},
                                      "defective_recall": {"diff_pt": 0.0, "ci95_pt": [-0.5, 0.5], "p_value": 1.0}}}
    acc = acceptance_check(rows, CFG)
    crit = next(c for c in acc["criteria"] if c["name"] == "accuracy_drop_pt")
    assert not crit["passed"] and crit["value"] == 2.1 and "95% interval of the drop" in crit["detail"]
