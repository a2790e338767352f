"""lathe.package: threshold, gates and selection, the stamp, byte-stable files, git dirtiness, the dvc.lock chain."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lathe.errors import ConfigError, DataError
from lathe.ship.card import selftest_indices
from lathe.ship.contract import model_stamp, npz_bytes, package_id_of, stamp_model_bytes, unstamped_model_bytes
from lathe.ship.gates import (
    Candidate,
    Threshold,
    check_gates,
    choice_problems,
    choose_threshold,
    gate_table,
    measured_failures,
    rates_at,
    select,
    selection_row,
)
from lathe.ship.lineage import dirty_paths, stage_chain
from lathe.ship.params import GateParams, PackageParams, TargetParams, parse_targets


def tiny_onnx(seed: int = 0, size: int = 4) -> bytes:
    """(N, 1, S, S) float -> Flatten -> Gemm -> (N, 4) logits; ir_version 10 for onnxruntime."""
    rng = np.random.default_rng(seed)
    w = helper.make_tensor("w", TensorProto.FLOAT, [size * size, 4], rng.normal(size=(size * size, 4)).astype(np.float32).ravel())
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("Gemm", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    helper.set_model_props(model, {"lathe.quantize.source_sha256": "abc"})
    return model.SerializeToString()


# --- threshold


def test_threshold_is_the_highest_reaching_the_recall_target():
    # defective p: 0.9 0.8 0.7 0.6 0.5; 80% of 5 -> 4 caught -> t = 0.6
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.65, 0.1])
    y = np.array([3, 3, 2, 3, 2, 0, 1])
    t = choose_threshold(p, y, [2, 3], 0.8)
    assert t == 0.6
    r = rates_at(p, y, [2, 3], t)
    assert r["defective_recall"] == 0.8 and r["escape_rate"] == 0.2 and r["false_reject_rate"] == 0.5
    assert choose_threshold(p, y, [2, 3], 1.0) == 0.5
    assert choose_threshold(p, y, [2, 3], 0.01) == 0.9  # at least one defective sample is caught


def test_threshold_rounds_down_so_the_target_still_holds_and_ties_are_deterministic():
    p = np.array([0.12345678, 0.12345678, 0.9])
    y = np.array([2, 2, 2])
    t = choose_threshold(p, y, [2, 3], 0.5)
    assert t == 0.123456 and rates_at(p, y, [2, 3], t)["defective_recall"] == 1.0  # tie: both caught


def test_threshold_without_defective_samples_is_an_error():
    with pytest.raises(DataError, match="no defective sample"):
        choose_threshold(np.array([0.3]), np.array([0]), [2, 3], 0.9)


# --- gates and selection


def cand(name: str, size: int, p50: float, acc: float = 0.8, recall: float = 0.9, frr: float = 0.1,
         gates: GateParams | None = None) -> Candidate:
    th = Threshold(0.5, 0.9, {}, {"defective_recall": recall, "false_reject_rate": frr})
    m = {"size_bytes": size, "latency_p50_ms": p50, "accuracy": acc}
    return Candidate(name, m, th, check_gates(gates or GateParams(max_size_bytes=1000, min_accuracy=0.7,
                                                                   min_defective_recall=0.85, max_false_reject_rate=0.2), m, th))


def policy_pool() -> list[Candidate]:
    """Five candidates: the smallest, fastest and most accurate passing ones differ; one fails but beats all."""
    return [cand("big_accurate", 900, 0.5, acc=0.95), cand("mid_fast", 400, 0.05, acc=0.8),
            cand("small", 100, 0.9, acc=0.75), cand("small_accurate", 100, 0.9, acc=0.76),
            cand("tiny_bad", 10, 0.01, acc=0.5)]


def test_select_smallest_breaks_size_ties_by_accuracy_never_by_latency():
    cs = policy_pool()
    assert select(cs, "smallest").variant == "small_accurate"  # 100 B twice: the more accurate one
    assert select(cs).variant == "small_accurate"  # smallest is the default
    assert not cs[4].passed and [g["gate"] for g in cs[4].gates if not g["passed"]] == ["min_accuracy"]
    # equal size and accuracy: the name decides, whatever the latencies
    tie = [cand("b", 100, 0.1), cand("a", 100, 0.9)]
    assert select(tie, "smallest").variant == "a"


def test_select_lets_no_latency_measured_here_decide_which_variant_ships():
    """The chosen variant is part of the package's identity; a p50 on the build machine is not the target's."""
    gates = GateParams(max_size_bytes=1000, max_latency_p50_ms=0.5, min_accuracy=0.7)
    slow_small, fast_big = cand("slow_small", 100, 0.9, gates=gates), cand("fast_big", 900, 0.1, gates=gates)
    assert not slow_small.passed and fast_big.passed
    assert select([slow_small, fast_big]).variant == "slow_small"  # on a faster machine it would pass: same choice
    assert measured_failures(slow_small) == ["max_latency_p50_ms: 0.900 ms > 0.500 ms"] and measured_failures(fast_big) == []
    assert select([cand("bad", 100, 0.1, acc=0.5, gates=gates)]) is None  # the other gates still decide
    rows = [selection_row(c) for c in (slow_small, fast_big)]  # as manifest.selection lists them; verify reads them
    assert choice_problems("smallest", "slow_small", rows) == []
    # ... unless latency decided, as before 2026-12-08: fast_big was the best of the rows passing every gate then,
    # and a package an auditor holds from that time must still verify
    earlier = [{**r, "passed": True, "failed": []} if r["variant"] == "fast_big" else r for r in rows]
    assert choice_problems("smallest", "fast_big", earlier) == []
    assert "picks small_ok" in " ".join(choice_problems("smallest", "fast_big", [*earlier, selection_row(
        cand("small_ok", 50, 0.1, gates=gates))]))  # a smaller variant passing every gate: wrong by either rule


def test_select_fastest_ranks_by_p50_then_size_then_accuracy_then_name():
    cs = policy_pool()
    assert select(cs, "fastest").variant == "mid_fast"  # tiny_bad is faster but fails a gate
    tie = [cand("c", 300, 0.2, acc=0.9), cand("b", 200, 0.2, acc=0.8), cand("a", 200, 0.2, acc=0.85)]
    assert select(tie, "fastest").variant == "a"
    assert select([cand("z", 200, 0.2), cand("y", 200, 0.2)], "fastest").variant == "y"


def test_select_most_accurate_ranks_by_accuracy_then_size_then_name():
    cs = policy_pool()
    assert select(cs, "most_accurate").variant == "big_accurate"
    tie = [cand("b", 500, 0.1, acc=0.9), cand("a", 900, 0.1, acc=0.9), cand("c", 500, 0.1, acc=0.9)]
    assert select(tie, "most_accurate").variant == "b"


def test_choice_problems_accepts_each_policys_own_choice_and_names_a_wrong_one():
    rows = [selection_row(c) for c in policy_pool()]
    for policy, best in (("smallest", "small_accurate"), ("fastest", "mid_fast"), ("most_accurate", "big_accurate")):
        assert choice_problems(policy, best, rows) == [], policy
        wrong = choice_problems(policy, "small", rows)
        assert len(wrong) == 1 and f"policy {policy}" in wrong[0] and f"picks {best}" in wrong[0], wrong
    assert "did not pass" in " ".join(choice_problems("smallest", "tiny_bad", rows))
    assert "not among" in choice_problems("smallest", "ghost", rows)[0]
    assert "metrics.test says" in " ".join(choice_problems("most_accurate", "big_accurate", rows, {"accuracy": 0.5}))
    twice = choice_problems("smallest", "small_accurate", rows + [rows[0]])
    assert "listed twice: big_accurate" in twice[0]
    lying = [dict(r, passed=True) if r["variant"] == "tiny_bad" else r for r in rows]
    problems = choice_problems("smallest", "tiny_bad", lying)
    assert any("tiny_bad: passed=True but failed gates ['min_accuracy']" in p for p in problems), problems
    old = [{k: v for k, v in r.items() if k != "accuracy"} for r in rows]  # a package from before policies
    assert "do not list" in choice_problems("most_accurate", "big_accurate", old)[0]


def test_target_selection_defaults_to_smallest_and_refuses_an_unknown_policy():
    t = parse_targets({"targets": {"gw": {}, "pc": {"selection": "most_accurate"}}})
    assert t["gw"].selection == "smallest" and t["pc"].selection == "most_accurate"
    with pytest.raises(ConfigError, match=r"targets\.pc\.selection"):
        parse_targets({"targets": {"pc": {"selection": "biggest"}}})


def test_shipped_params_choose_smallest_for_the_gateway_and_most_accurate_for_the_line_pc():
    from lathe.config import load_params

    targets = parse_targets(load_params(Path(__file__).resolve().parents[3] / "params.yaml"))
    assert targets["arm-gateway"].selection == "smallest" and targets["line-pc"].selection == "most_accurate"


def test_no_variant_passes_gives_none_and_a_table_of_every_variant_and_gate():
    cs = [cand("a", 2000, 0.1), cand("b", 100, 0.1, frr=0.5)]
    assert select(cs) is None
    table = gate_table("t", cs)
    for word in ("| a |", "| b |", "max_size_bytes (1,000 B)", "2,000 B FAIL", "0.500 FAIL", "max_latency_p50_ms (not gated)"):
        assert word in table, table
    assert len(table.splitlines()) == 4


def test_unset_gate_is_reported_but_not_checked():
    c = cand("a", 10**9, 99.0, gates=GateParams())
    assert c.passed and all(g["limit"] is None for g in c.gates)


# --- config


def test_targets_are_a_mapping_with_safe_names_and_typos_name_the_key():
    t = parse_targets({"targets": {"arm-gateway": {"gates": {"max_size_bytes": 400000}}}})
    assert isinstance(t["arm-gateway"], TargetParams) and t["arm-gateway"].gates.max_size_bytes == 400000
    with pytest.raises(ConfigError, match=r"targets\.x\.gates\.min_acc"):
        parse_targets({"targets": {"x": {"gates": {"min_acc": 0.5}}}})
    with pytest.raises(ConfigError, match="must match"):
        parse_targets({"targets": {"../x": {}}})
    with pytest.raises(ValueError, match="relative path"):
        PackageParams(variants=["../teacher"])


# --- stamp and byte-stable files


def test_stamp_roundtrip_keeps_other_metadata_and_is_sorted():
    plain = unstamped_model_bytes(tiny_onnx())
    stamped = stamp_model_bytes(plain, "0123456789abcdef", "f" * 64)
    assert model_stamp(stamped) == {"lathe.package_id": "0123456789abcdef", "lathe.manifest_sha256": "f" * 64}
    assert unstamped_model_bytes(stamped) == plain
    keys = [p.key for p in onnx.load_from_string(stamped).metadata_props]
    assert keys == sorted(keys) and "lathe.quantize.source_sha256" in keys
    assert stamp_model_bytes(plain, "0123456789abcdef", "f" * 64) == stamped


def test_npz_is_byte_stable_and_loads_without_pickle(tmp_path):
    arrays = {"images": np.arange(32, dtype=np.uint8).reshape(2, 4, 4), "logits": np.ones((2, 4), np.float32)}
    a, b = npz_bytes(arrays), npz_bytes(dict(reversed(arrays.items())))
    assert a == b
    (tmp_path / "s.npz").write_bytes(a)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        assert z["images"].dtype == np.uint8 and np.array_equal(z["logits"], arrays["logits"])


def test_package_id_ignores_build_and_itself():
    m = {"schema": "s", "variant": "v", "build": {"time": "t1"}}
    pid = package_id_of(m)
    assert pid == package_id_of({**m, "build": {"time": "t2"}, "package_id": "x"}) and len(pid) == 16
    assert pid != package_id_of({**m, "variant": "w"})


def test_package_id_is_the_same_whether_the_chosen_variant_met_the_latency_gate_on_this_machine_or_not():
    """Measured on two AMD EPYCs (families 25 and 23): qat/student 0.418 ms (pass) and 0.797 ms (FAIL) against 0.5 ms,
    the same variant chosen from the same commit; the two ids differed until the chosen verdict left the identity."""
    def manifest(p50: float) -> dict:
        gate = {"gate": "max_latency_p50_ms", "limit": 0.5, "value": p50, "passed": p50 <= 0.5}
        row = {"variant": "qat/student", "size_bytes": 142611, "accuracy": 0.758, "latency_p50_ms": p50,
               "passed": p50 <= 0.5, "failed": [] if p50 <= 0.5 else ["max_latency_p50_ms"]}
        return {"schema": "s", "variant": "qat/student", "gates": [gate], "selection": [row]}

    fast, slow = manifest(0.418), manifest(0.797)
    assert package_id_of(fast) == package_id_of(slow)
    # held at true, not dropped: a package built before 2026-12-08 (its chosen variant always passed) keeps its id
    assert package_id_of(fast) == package_id_of({**fast, "gates": [{**fast["gates"][0], "passed": True}]})
    assert package_id_of(fast) != package_id_of({**fast, "gates": [{**fast["gates"][0], "limit": 0.6}]})


def test_selftest_indices_take_per_class_lowest_ids_in_id_order():
    labels = np.array([0, 1, 0, 2, 1, 0])
    ids = np.array([50, 40, 30, 20, 10, 0])
    idx = selftest_indices(labels, ids, 1)
    assert ids[idx].tolist() == [0, 10, 20]


# --- lineage


def test_stage_chain_walks_back_from_the_model_to_raw_data():
    lock = {"stages": {
        "ingest": {"cmd": "i", "deps": [{"path": "data/raw", "md5": "r.dir"}, {"path": "lathe/x.py", "md5": "c"}],
                   "outs": [{"path": "data/prepared", "md5": "p.dir"}]},
        "train": {"cmd": "t", "deps": [{"path": "data/prepared", "md5": "p.dir"}], "outs": [{"path": "models/teacher", "md5": "m.dir"}]},
        "quantize@teacher": {"cmd": "q", "deps": [{"path": "models/teacher/model.onnx", "md5": "f"}],
                             "outs": [{"path": "models/quantized/teacher", "md5": "q.dir"}], "params": {"params.yaml": {"quantize": {}}}},
        "other": {"cmd": "o", "deps": [], "outs": [{"path": "models/other", "md5": "o"}]},
    }}
    order, entries, leaves = stage_chain(lock, ["models/quantized/teacher"])
    assert order == ["ingest", "train", "quantize@teacher"] and leaves == {"data/raw"}
    assert entries["quantize@teacher"]["deps"] == [{"path": "models/teacher/model.onnx", "md5": "f"}]
    assert entries["quantize@teacher"]["params"] == {"params.yaml": {"quantize": {}}}


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_dirty_paths_ignore_dvc_outputs_and_lock_but_not_code(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        "vars:\n  - vs: [a, b]\nstages:\n  ev:\n    foreach: ${vs}\n    do:\n      cmd: x\n"
        "      outs:\n        - reports/${item}/p.csv\n      metrics:\n        - reports/${item}/m.json:\n            cache: false\n"
        "  tr:\n    cmd: y\n    outs: [models/teacher]\n")
    (tmp_path / "code.py").write_text("a = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "x")
    for rel in ("reports/a/m.json", "reports/b/p.csv", "models/teacher/model.onnx", "models/.gitignore", "dvc.lock",
                "models/packages/t/manifest.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert dirty_paths(tmp_path, {"models/packages/t"}) == []
    (tmp_path / "code.py").write_text("a = 2\n")
    (tmp_path / "stray.txt").write_text("?")
    assert dirty_paths(tmp_path, {"models/packages/t"}) == ["code.py", "stray.txt"]


def test_a_killed_build_leaves_nothing_behind_and_the_last_package_comes_back(tmp_path):
    from lathe.ship.build import recover_interrupted_build

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that no longer runs
    dest = tmp_path / "packages" / "gw"
    staging = tmp_path / "packages" / f".gw.{dead}.abc12345.tmp"  # killed while staging
    (staging / "gw").mkdir(parents=True)
    (staging / "gw" / "manifest.json").write_text("{}")
    old = tmp_path / "packages" / ".gw.old-def456" / "gw"  # killed between the two renames
    old.mkdir(parents=True)
    (old / "manifest.json").write_text('{"package_id": "last-good"}')
    (tmp_path / "packages" / f".other.{dead}.abc12345.tmp").mkdir()  # another target's: not ours to touch
    (tmp_path / "packages" / f".gw.{os.getpid()}.abc12345.tmp").mkdir()  # a live build's: kept

    recover_interrupted_build(dest)

    assert (dest / "manifest.json").read_text() == '{"package_id": "last-good"}'
    assert sorted(p.name for p in (tmp_path / "packages").iterdir()) == [
        f".gw.{os.getpid()}.abc12345.tmp", f".other.{dead}.abc12345.tmp", "gw"]


def test_recovery_keeps_a_present_package_and_drops_the_stale_copy(tmp_path):
    from lathe.ship.build import recover_interrupted_build

    dest = tmp_path / "gw"
    dest.mkdir()
    (dest / "manifest.json").write_text("current")
    (tmp_path / ".gw.old-1" / "gw").mkdir(parents=True)

    recover_interrupted_build(dest)

    assert (dest / "manifest.json").read_text() == "current"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gw"]
