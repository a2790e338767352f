"""QAT against its controls, over seeds: what quantization-aware fine-tuning adds beyond more fine-tuning.

Not part of the pipeline. For each `qat.seed`, from the pipeline's float student and teacher:

- qat:      the qat stage's recipe (lathe.compress.qat.qat_finetune);
- ft+ptq:   the control, the same fine-tune (loss, epochs, lr, seed, batches) without fake quantizers,
            then the quantize stage's post-training INT8 (lathe.compress.quantize.quantize_model);

and the pipeline's own PTQ student (models/quantized/student) as the reference every seed shares. Each
is evaluated like the evaluate stage (onnxruntime, test split), and QAT is compared with both, paired on
the same test cells (lathe.measure.intervals.paired: bootstrap interval, McNemar p).

    python -m scripts.qat_experiment --seeds 0,1,2 --out /tmp/qat-exp

Writes --out/results.json and prints a markdown table. Test figures are for reporting only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import stages  # noqa: F401  (pins the numeric platform before torch loads, as every stage does)
from lathe.compress.params import QatParams, QuantizeParams
from lathe.compress.qat import qat_finetune, qat_loss, write_qat
from lathe.compress.quantize import quantize_model, write_quantized
from lathe.config import load_params, parse_section
from lathe.data.contract import read_task
from lathe.data.ingest import load_split
from lathe.determinism import make_deterministic
from lathe.measure.evaluate import evaluate_model
from lathe.measure.intervals import Cells, cells_of, intervals, paired
from lathe.measure.params import EvaluateParams
from lathe.model.teacher import load_model, write_model_dir
from lathe.model.train import fit

JUDGED = ("accuracy", "defective_recall", "false_reject_rate")


def cells_and_figures(model_dir: Path, prepared: Path, cfg: EvaluateParams) -> tuple[Cells, dict[str, Any]]:
    """The evaluate stage's figures of `model_dir/model.onnx` on test, with intervals, and its per-cell outcomes."""
    result = evaluate_model(model_dir, prepared, cfg)
    task = read_task(prepared)
    cells = cells_of(result.labels, result.predicted, task.defective_indices, task.num_classes)
    found = intervals(cells)
    return cells, {m: [round(found[m].value, 4), round(found[m].low, 4), round(found[m].high, 4)] for m in JUDGED} | {
        "size_bytes": result.metrics["size_bytes"]}


def finetune_then_ptq(student: Path, teacher: Path, prepared: Path, cfg: QatParams, quant: QuantizeParams,
                      out: Path) -> Path:
    """The control: qat's fine-tune in float, then the quantize stage's INT8; returns the INT8 folder."""
    model = load_model(student, "float model")
    gen = make_deterministic(cfg.seed, cfg.threads)
    train, val, task = load_split(prepared, "train"), load_split(prepared, "val"), read_task(prepared)
    result = fit(model, train, val, cfg, gen, task, loss_fn=qat_loss(teacher, train, cfg, task))
    write_model_dir(out / "float", model, model.spec, model.image_size, result, val["images"][:16])
    write_quantized(out / "int8", quantize_model(out / "float", prepared, quant))
    return out / "int8"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--repo", type=Path, default=Path("."), help="a repo after `make run`")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    repo = args.repo
    params = load_params(repo / "params.yaml")
    base, quant = parse_section(params, "qat", QatParams), parse_section(params, "quantize", QuantizeParams)
    ecfg = EvaluateParams(latency_warmup=0, latency_runs=1, throughput_batch=8, throughput_runs=1)  # quality only
    prepared, student, teacher = repo / "data/prepared", repo / "models/student", repo / "models/teacher"
    ptq_cells, ptq = cells_and_figures(repo / "models/quantized/student", prepared, ecfg)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = base.model_copy(update={"seed": seed})
        out = args.out / f"seed{seed}"
        write_qat(out / "qat", qat_finetune(student, prepared, cfg, teacher))
        qat_cells, qat = cells_and_figures(out / "qat", prepared, ecfg)
        ctl_cells, ctl = cells_and_figures(finetune_then_ptq(student, teacher, prepared, cfg, quant, out / "ft"),
                                           prepared, ecfg)
        row = {"seed": seed, "qat": qat, "ft_ptq": ctl, "ptq": ptq,
               "qat_vs_ft_ptq": {m: d.points() for m, d in paired(qat_cells, ctl_cells).items() if m in JUDGED},
               "qat_vs_ptq": {m: d.points() for m, d in paired(qat_cells, ptq_cells).items() if m in JUDGED}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
