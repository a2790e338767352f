"""The model card: everything above its measured section is the same wherever the package is rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

from lathe.compress.records import QAT_RECORD, QUANTIZE_RECORD
from lathe.data.contract import Task
from lathe.ship.card import model_card
from lathe.ship.contract import CARD_MEASURED_HEADER
from lathe.ship.gates import Candidate, Threshold, check_gates
from lathe.ship.lineage import calibration_record, qat_record
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
    return model_card("edge", PROFILE, chosen, candidates, RAW, VALIDATION, None, None, TASK,
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


def test_a_quantization_aware_model_says_how_its_int8_ranges_were_made(tmp_path: Path):
    """A QAT model has no calibration set; its card names the training that set its ranges instead of
    leaving the INT8 line out (which it did before: the card read quantize.json only)."""
    (tmp_path / QAT_RECORD).write_text(json.dumps({
        "method": "torchao PT2E QAT", "best_epoch": 2, "settings": {"epochs": 4},
        "quantization": {"weights": "int8 per channel, symmetric, -64..63", "activations": "uint8 per tensor, affine"},
        "source": {"weights_sha256": "c8" * 32}, "teacher": {"weights_sha256": "a1" * 32}}))
    qat = qat_record(tmp_path)
    assert calibration_record(tmp_path) is None
    assert qat is not None and qat["teacher_weights_sha256"] == "a1" * 32

    chosen = candidate("qat/student", 300, 0.75, 0.4)
    card = model_card("edge", PROFILE, chosen, [chosen], RAW, VALIDATION, None, qat, TASK,
                      {"cpu": "AMD EPYC", "cores": 2, "vendor_flags": ["avx2"]})

    assert ("- INT8 by quantization-aware training (torchao PT2E QAT): 4 epochs on the train split, epoch 2 "
            "picked on val; weights int8 per channel, symmetric, -64..63, activations uint8 per tensor, affine; "
            "no calibration set (ranges learned while fine-tuning); fine-tuned from weights sha256 "
            "`c8c8c8c8c8c8c8c8...`") in card
    assert "INT8 calibration" not in card


def test_a_post_training_int8_model_names_its_calibration_set_and_no_training(tmp_path: Path):
    (tmp_path / QUANTIZE_RECORD).write_text(json.dumps(
        {"calibration": {"sample_ids_sha256": "e" * 64, "size": 256, "method": "entropy"}}))
    assert qat_record(tmp_path) is None
    chosen = candidate("quantized/student", 300, 0.75, 0.4)
    card = model_card("edge", PROFILE, chosen, [chosen], RAW, VALIDATION, calibration_record(tmp_path), None, TASK,
                      {"cpu": "AMD EPYC", "cores": 2, "vendor_flags": ["avx2"]})
    assert "- INT8 calibration: 256 train samples, entropy, ids sha256 `eeeeeeeeeeeeeeee...`" in card
    assert "quantization-aware" not in card
