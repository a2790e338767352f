"""Gate profiles (lathe gates): loading a profile file and the per-target verdict."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lathe.errors import ConfigError
from lathe.ship.gates import Candidate, Threshold, check_gates
from lathe.ship.params import GateParams, TargetParams
from lathe.ship.profile import TargetVerdict, closest, load_profile, verdict_line

PLANT = TargetParams(defective_recall_target=0.95,
                     gates=GateParams(min_accuracy=0.73, min_defective_recall=0.95, max_false_reject_rate=0.20))


def candidate(variant: str, accuracy: float, recall: float, frr: float) -> Candidate:
    rates = {"defective_recall": recall, "escape_rate": 1 - recall, "false_reject_rate": frr, "n_defective": 200,
             "n_functional": 450, "defective_recall_ci95_low": recall - 0.03, "defective_recall_ci95_high": recall + 0.02,
             "false_reject_rate_ci95_low": frr - 0.04, "false_reject_rate_ci95_high": frr + 0.05}
    metrics = {"size_bytes": 1000, "accuracy": accuracy, "latency_p50_ms": 0.4}
    threshold = Threshold(value=0.1164, recall_target=0.95, val=rates, test=rates)
    return Candidate(variant, metrics, threshold, check_gates(PLANT.gates, metrics, threshold))


def test_the_profile_shipped_in_the_repository_loads():
    targets = load_profile(Path(__file__).resolve().parents[3] / "profiles" / "plant.yaml")

    assert targets["line-pc"].gates.min_defective_recall == 0.95 and targets["line-pc"].gates.max_false_reject_rate == 0.20
    assert targets["arm-gateway"].gates.min_defective_recall == 0.90
    assert targets["arm-gateway"].gates.max_false_reject_rate == 0.15


def test_a_typo_in_a_profile_is_an_error_naming_the_file_and_key(tmp_path):
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump({"targets": {"line-pc": {"gates": {"min_recall": 0.95}}}}))

    with pytest.raises(ConfigError) as err:
        load_profile(path)

    assert str(path) in str(err.value) and "targets.line-pc.gates.min_recall: unknown key" in str(err.value)


def test_the_verdict_names_the_closest_variant_and_every_gate_it_misses():
    far = candidate("student", 0.70, 0.91, 0.45)  # misses accuracy, recall and false rejects
    near = candidate("teacher", 0.743, 0.956, 0.591)  # misses false rejects only
    verdict = TargetVerdict("line-pc", PLANT, [far, near], chosen=None)

    line = verdict_line(verdict)

    assert closest([far, near]) is near
    assert line == ("line-pc: FAIL - no variant passes every gate (latency apart); closest teacher (threshold 0.1164 on val): test "
                    "defective recall 0.956 (0.926-0.976), false-reject rate 0.591 (0.551-0.641); misses "
                    "max_false_reject_rate 0.591 > 0.2")


def test_a_target_with_a_passing_variant_names_the_policys_choice():
    good = candidate("quantized/teacher", 0.80, 0.96, 0.15)
    verdict = TargetVerdict("line-pc", PLANT, [good, candidate("student", 0.70, 0.91, 0.45)], chosen=good)

    assert verdict_line(verdict) == ("line-pc: PASS - 1 of 2 variants pass every gate (latency apart); policy "
                                     "smallest chooses quantized/teacher")
