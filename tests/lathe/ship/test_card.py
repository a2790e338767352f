"""The model card: everything above its measured section is the same wherever the package is rebuilt."""

from __future__ import annotations

from lathe.data.contract import Task
from lathe.ship.card import model_card
from lathe.ship.contract import CARD_MEASURED_HEADER
from lathe.ship.gates import Candidate, Threshold, check_gates
from lathe.ship.params import GateParams, TargetParams

TASK = Task(classes=["ok", "crack"], defective=["crack"], image_size=8)
PROFILE = TargetParams(gates=GateParams(max_size_bytes=1000, max_latency_p50_ms=1.0, min_accuracy=0.7))
RATES = {"defective_recall": 0.9, "escape_rate": 0.1, "false_reject_rate": 0.2, "n_defective": 10, "n_functional": 20}
RAW = {"path": "data/raw", "md5": "m" * 32, "files": 31, "samples": 30, "class_counts": {"ok": 20, "crack": 10}}
VALIDATION = {"summary": "12/12 expectations met", "sha256": "d" * 64}


def candidate(variant: str, size: int, accuracy: float, p50_ms: float) -> Candidate:
    metrics = {"size_bytes": size, "accuracy": accuracy, "latency_p50_ms": p50_ms, "n_test": 30}
    threshold = Threshold(value=0.5, recall_target=0.85, val=RATES, test=RATES)
    return Candidate(variant, metrics, threshold, check_gates(PROFILE.gates, metrics, threshold))


def card_on(machine: str, pruned_p50_ms: float) -> str:
    """The card a machine writes: it times the chosen model alike and the pruned one at `pruned_p50_ms`."""
    chosen = candidate("quantized/student", 300, 0.75, 0.4)
    candidates = [candidate("teacher", 5000, 0.8, 2.0), candidate("quantized/pruned", 600, 0.76, pruned_p50_ms), chosen]
    return model_card("edge", PROFILE, chosen, candidates, RAW, VALIDATION, None, TASK,
                      {"cpu": machine, "cores": 2, "vendor_flags": ["avx2"]})


def test_the_latency_gate_verdict_of_another_candidate_is_in_the_measured_section_only():
    """ELPV's quantized/pruned took 0.36 ms on an Intel Xeon and 1.07 ms on an AMD EPYC: it passed the
    1 ms gate on one and failed it on the other; the card above its measured section must not change."""
    intel, amd = card_on("Intel Xeon", 0.36), card_on("AMD EPYC", 1.07)

    head_intel, _, measured_intel = intel.partition(CARD_MEASURED_HEADER)
    head_amd, _, measured_amd = amd.partition(CARD_MEASURED_HEADER)

    assert head_intel == head_amd
    assert "Passing every gate but the measured latency: 2 of 3 evaluated variants (quantized/pruned, " \
           "quantized/student)" in head_amd
    assert "quantized/pruned 0.360 ms pass" in measured_intel and "quantized/pruned 1.070 ms FAIL" in measured_amd
    assert "teacher" not in measured_amd.split("other gate:")[1]  # it fails the size gate wherever it is timed
