"""What a package tells its reader: preprocessing.json, the model card, and the self-test's choice of images."""

from __future__ import annotations

import numpy as np
import onnx

from lathe.data.contract import Task
from lathe.markdown import markdown_table
from lathe.measure.evaluate import recall_key
from lathe.ship.contract import (
    CARD_MEASURED_HEADER,
    MEASURED_GATES,
    SELFTEST_ATOL,
    SELFTEST_FILE,
    Preprocessing,
)
from lathe.ship.gates import (
    MEASURED_RANK_FIELDS,
    RANKS,
    Candidate,
    gate_table,
    passes_unmeasured_gates,
    rank_rule,
)
from lathe.ship.params import TargetParams


def selftest_indices(labels: np.ndarray, sample_ids: np.ndarray, per_class: int) -> np.ndarray:
    """Up to `per_class` test images per class, lowest sample ids first; returned in sample-id order."""
    picked: list[int] = []
    for k in sorted(set(np.asarray(labels).tolist())):
        idx = np.flatnonzero(labels == k)
        picked.extend(idx[np.argsort(sample_ids[idx], kind="stable")][:per_class].tolist())
    chosen = np.asarray(picked, dtype=np.int64)
    return chosen[np.argsort(sample_ids[chosen], kind="stable")]


COLOR_RULE = {  # how a source image becomes the model's channels (lathe.data.images)
    1: "grayscale: colour sources converted with Pillow convert('L') (ITU-R 601-2 luma), alpha over black",
    3: "RGB: gray sources replicated to R=G=B, alpha composited over black",
}
RESIZE_RULE = {
    "squash": "area averaging to a square (Pillow Image.resize, BOX); the aspect ratio is not kept",
    "pad": "area averaging of the longer side to the size (Pillow BOX), aspect kept, centred on black",
}


def preprocessing_record(model_bytes: bytes, task: Task, threshold: float) -> dict:
    proto = onnx.load_from_string(model_bytes)
    inits = {t.name for t in proto.graph.initializer}
    inp = [i for i in proto.graph.input if i.name not in inits][0]
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in inp.type.tensor_type.shape.dim]
    record = {
        "input": {"name": inp.name, "shape": shape, "dtype": "float32", "layout": "NCHW"},
        "output": {"name": proto.graph.output[0].name, "kind": "logits", "shape": [shape[0], task.num_classes]},
        "source_image": {"dtype": "uint8", "channels": task.channels, "color": COLOR_RULE[task.channels],
                         "bit_depth": "8-bit; 16-bit sources scaled by their depth (v * 255 / 65535)"},
        "resize": {"size": [task.image_size, task.image_size], "method": RESIZE_RULE[task.resize],
                   "policy": task.resize},
        "normalise": {"divide_by": 255.0, "mean": 0.0, "std": 1.0, "rule": "(x / divide_by - mean) / std, float32"},
        "class_names": list(task.classes),
        "defective_classes": list(task.defective),
        "decision": {"p_defective": f"sum(softmax(logits)[{task.defective_indices}])", "threshold": threshold,
                     "rule": "defective when p_defective >= threshold"},
        "selftest": {"file": SELFTEST_FILE, "inputs": "images", "outputs": "logits", "atol": SELFTEST_ATOL},
    }
    Preprocessing.model_validate(record)  # what verify will demand of it, checked before it is signed
    return record


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pct_ci(figures: dict, key: str) -> str:
    """74.3% (95% interval 70.9-77.6%) when `figures` carries the key's bootstrap interval."""
    lo, hi = figures.get(f"{key}_ci95_low"), figures.get(f"{key}_ci95_high")
    ci = f" (95% interval {100 * lo:.1f}-{100 * hi:.1f}%)" if lo is not None and hi is not None else ""
    return _pct(figures.get(key, 0.0)) + ci


def selection_lines(profile: TargetParams, chosen: Candidate, candidates: list[Candidate]) -> list[str]:
    """The card's "Selection" section: policy, its ranking, and the candidates passing every gate not
    measured on the machine, among which the choice is made (the latency gate's verdicts are in the measured
    section: another machine may time a candidate, the chosen one too, on the other side of the limit)."""
    policy = profile.selection
    passing = [c.variant for c in candidates if passes_unmeasured_gates(c)]
    lines = ["## Selection", "",
             (f"Policy `{policy}`: the best by {rank_rule(policy)} among the variants passing every gate but the "
              f"latency measured on the build machine, which is reported and does not decide; "
              f"chosen: **{chosen.variant}**. Passing every gate but the measured latency: {len(passing)} of "
              f"{len(candidates)} evaluated variants ({', '.join(passing)}); their latency verdicts are in the "
              "last section.")]
    if any(f in MEASURED_RANK_FIELDS for f, _ in RANKS[policy]):
        lines.append("This policy ranks by latency measured on the build machine (figures in the last section): "
                     "a rebuild that measures again elsewhere may rank the variants differently.")
    return lines + [""]


def _latency_verdicts(candidates: list[Candidate]) -> str:
    """'a 0.41 ms pass, b 1.07 ms FAIL' for the candidates passing every unmeasured gate."""
    out = []
    for c in candidates:
        if passes_unmeasured_gates(c):
            ok = all(g["passed"] for g in c.gates if g["gate"] in MEASURED_GATES)
            out.append(f"{c.variant} {c.metrics['latency_p50_ms']:.3f} ms {'pass' if ok else 'FAIL'}")
    return ", ".join(out) or "none"


def _qat_line(qat: dict) -> str:
    """How a quantization-aware model got its INT8 ranges: it has no calibration set to name."""
    q = qat.get("quantization") or {}
    return (f"- INT8 by quantization-aware training ({qat.get('method') or '-'}): {qat.get('epochs')} epochs on the "
            f"train split, epoch {qat.get('best_epoch')} picked on val; weights {q.get('weights', '-')}, activations "
            f"{q.get('activations', '-')}; no calibration set (ranges learned while fine-tuning); fine-tuned from "
            f"weights sha256 `{str(qat.get('source_weights_sha256'))[:16]}...`")


def model_card(target: str, profile: TargetParams, chosen: Candidate, candidates: list[Candidate], raw: dict,
               validation: dict, calibration: dict | None, qat: dict | None, task: Task, machine: dict) -> str:
    """The human-readable card; `machine` (lathe.determinism.machine_record) only in its last section."""
    m, t = chosen.metrics, chosen.threshold
    lines = [
        f"# Model card: {target} / {chosen.variant}", "",
        "## Intended use", "",
        "Screening images of parts on a production line for defects. "
        f"Input: one image, {'grayscale' if task.channels == 1 else 'RGB'}, resized ({task.resize}) to "
        f"{task.image_size}x{task.image_size} px. Output: {task.num_classes} classes "
        f"({', '.join(task.classes)}); a part is judged *defective* when the softmax mass on "
        f"{', '.join(task.defective)} reaches the decision threshold. "
        "A decision aid for inspection staff: escapes happen at the rate below, so it does not replace "
        "the plant's final quality check.", "",
        f"Target profile `{target}`: {profile.description or '-'}; runtime {profile.runtime}, "
        f"{profile.threads} thread(s), batch {profile.batch}.", "",
        "## Data", "",
        f"- raw data `{raw['path']}` md5 `{raw['md5']}`, {raw['files']} files, {raw['samples']} samples",
        "- class counts: " + ", ".join(f"{k}: {v}" for k, v in raw["class_counts"].items()),
        f"- validation: {validation['summary']} (result sha256 `{validation['sha256'][:16]}...`)",
        f"- test split: {m.get('n_test', '?')} samples; threshold chosen on the val split "
        f"({t.val['n_defective']} defective, {t.val['n_functional']} functional)",
    ]
    if calibration:
        lines.append(f"- INT8 calibration: {calibration['size']} train samples, {calibration['method']}, "
                     f"ids sha256 `{str(calibration['sample_ids_sha256'])[:16]}...`")
    if qat:
        lines.append(_qat_line(qat))
    rates = markdown_table(
        ["split", "defective recall", "escape rate", "false-reject rate"],
        [[split, _pct_ci(r, "defective_recall"), _pct(r["escape_rate"]), _pct_ci(r, "false_reject_rate")]
         for split, r in (("val", t.val), ("test", t.test))],
        align=["", "right", "right", "right"])
    recalls = markdown_table(
        ["class", "recall"],
        [[f"{name} (defective)" if name in task.defective else name, _pct(m.get(recall_key(name), 0.0))]
         for name in task.classes],
        align=["", "right"])
    lines += ["", "## Decision threshold", "",
              f"p_defective >= **{t.value}**: the highest threshold reaching defective recall "
              f">= {_pct(t.recall_target)} on the val split.", "",
              rates.removesuffix("\n"),
              "", f"## Metrics (test split, {task.num_classes}-class argmax)", "",
              f"- accuracy {_pct_ci(m, 'accuracy')}, balanced accuracy {_pct_ci(m, 'balanced_accuracy')}, "
              f"macro-F1 {m.get('macro_f1', 0):.3f}",
              f"- size {m['size_bytes']:,} B, {m.get('params', '?')} parameters (latency: the last section)", "",
              recalls.removesuffix("\n")]
    lines += ["", "## Gates", "", gate_table(target, [chosen], measured_apart=True), ""]
    lines += selection_lines(profile, chosen, candidates)
    lines += ["## Limits", "",
              "- Trained and judged on the data above only; other parts, cameras, lighting or exposure are out of "
              "scope until evaluated.",
              "- Small classes are judged on few test samples; read per-class recall before relying on them.",
              "- Latency was measured on the build machine, not on the device: run the self-test and time it there.",
              f"- Self-test: `{SELFTEST_FILE}` holds golden images and logits; outputs must match within "
              f"atol {SELFTEST_ATOL}.", ""]
    # Last, so that everything above is the same wherever the package is rebuilt (lathe.audit.rebuild
    # compares the text up to this header byte for byte and shows what follows side by side).
    lines += [CARD_MEASURED_HEADER, "",
              f"- p50 latency {m['latency_p50_ms']:.3f} ms, p95 {m.get('latency_p95_ms', 0):.3f} ms, throughput "
              f"{m.get('throughput_ips', 0):,.0f} images/s",
              f"- measured by the {m.get('timing_method', 'evaluate stage (method not recorded)')}; `make bench` "
              "times models interleaved in one process, so reports/bench.md differs on the same machine",
              f"- latency gate: {_latency_gate(chosen)}; the candidates passing every other gate: "
              f"{_latency_verdicts(candidates)}"]
    if any(f in MEASURED_RANK_FIELDS for f, _ in RANKS[profile.selection]):
        ranked = ", ".join(f"{c.variant} {c.metrics['latency_p50_ms']:.3f} ms" for c in candidates if c.passed)
        lines.append(f"- selection `{profile.selection}` ranked these p50 latencies: {ranked}")
    lines += [f"- on: {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores, "
              f"{' '.join(machine.get('vendor_flags', [])) or 'flags unknown'})", ""]
    return "\n".join(lines)


def _latency_gate(chosen: Candidate) -> str:
    for g in chosen.gates:
        if g["gate"] in MEASURED_GATES:
            limit = "not gated" if g["limit"] is None else f"limit {g['limit']} ms"
            return f"{limit}, {'passed' if g['passed'] else 'FAILED'}"
    return "none"
