"""Student recipe sweep: distil the pipeline's teacher into students of other shapes, then INT8 (PTQ).

Not part of the pipeline. It reuses the distill and quantize stages' code on the `distill:` and
`quantize:` params with overrides, so a row is what `distill` + `quantize` + `evaluate` would
report for that student. Run after `make run` (it needs models/teacher and data/prepared):

    python -m scripts.student_sweep --name s4 --set student.stem_stride=4 --set student.stem_kernel=5 \\
        --set "student.widths=[24,48,64]" --set "student.blocks=[1,1,1]" --seeds 0,1,2 --threads 1

Rows (float and INT8 test figures, MACs, parameters, INT8 size and p50 latency, 1 thread; the INT8
student against the teacher on the same test cells: agreement of their argmax classes and the paired
differences with 95% intervals, as compare reports them) are appended as JSON lines to
--out/results.jsonl. Latency there is timed alone and briefly: compare variants in one `make bench`-style
interleaved run before concluding on speed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import stages  # noqa: F401  the pipeline's numeric pins (lathe.determinism): before torch is imported

# isort: split
import numpy as np
import torch
from torch import nn

from lathe.compress.distill import RECORD, distill, distill_student, make_student
from lathe.compress.params import DistillParams, QuantizeParams
from lathe.compress.quantize import quantize_model, write_quantized
from lathe.compress.result import Compressed, write_compressed
from lathe.config import load_params
from lathe.data.contract import read_task
from lathe.data.ingest import load_split
from lathe.determinism import make_deterministic
from lathe.measure.evaluate import EvaluationResult, evaluate_model
from lathe.measure.intervals import cells_of, paired
from lathe.measure.ort import load_session, predict
from lathe.measure.params import EvaluateParams
from lathe.model.teacher import FILES
from lathe.model.train import to_tensor
from scripts.teacher_sweep import apply_overrides


class TwinTeacher(nn.Module):
    """A teacher that saw each cell at another resolution: the logits of a cell's twin (same sample id, the
    teacher's own prepared images), looked up by the student-size cell's bytes. (N, C, S, S) -> (N, K).

    For distillation without augmentation (the pipeline's): every batch is made of training cells as they
    are, so every row is found; a row that is not (an augmented cell) is an error, not a silent guess.
    """

    def __init__(self, images: np.ndarray, sample_ids: np.ndarray, twin_logits: dict[int, np.ndarray]):
        super().__init__()
        missing = sorted(set(sample_ids.tolist()) - twin_logits.keys())
        if missing:
            raise ValueError(f"no twin for {len(missing)} cell(s), e.g. sample id {missing[0]}")
        self.by_bytes = {row.numpy().tobytes(): torch.from_numpy(twin_logits[int(i)])
                         for row, i in zip(to_tensor(images), sample_ids, strict=True)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self.by_bytes.get(r.numpy().tobytes()) for r in x]
        if any(r is None for r in rows):
            raise KeyError("a batch row is not one of the training cells the twin logits were computed for")
        return torch.stack(rows)


def twin_teacher(teacher_dir: Path, teacher_prepared: Path, train: dict[str, np.ndarray], threads: int) -> TwinTeacher:
    """TwinTeacher with the ONNX teacher's logits of `teacher_prepared`'s training cells (onnxruntime)."""
    twins = load_split(teacher_prepared, "train")
    logits = predict(load_session(teacher_dir / FILES.onnx, threads), twins["images"])
    return TwinTeacher(train["images"], train["sample_ids"], dict(zip(twins["sample_ids"].tolist(), logits, strict=True)))


def same_cells(a: dict[str, np.ndarray], b: dict[str, np.ndarray], where: Path) -> None:
    """The paired comparison needs both evaluations on the same cells in the same order."""
    if not np.array_equal(a["sample_ids"], b["sample_ids"]):
        raise ValueError(f"{where}: its test split is not the same cells, in the same order, as the student's")


FIGURES = ("accuracy", "balanced_accuracy", "defective_recall", "false_reject_rate", "macs", "params", "size_bytes",
           "latency_p50_ms")


def against_teacher(student: EvaluationResult, teacher: EvaluationResult, defective: list[int], k: int) -> dict:
    """Agreement of the argmax classes and the paired differences (student - teacher, points, 95% interval)."""
    cells = [cells_of(r.labels, r.predicted, defective, k) for r in (student, teacher)]
    return {"agreement": round(float((student.predicted == teacher.predicted).mean()), 4),
            **{m: d.points() for m, d in paired(*cells).items()}}


def distill_from_twins(teacher_dir: Path, teacher_prepared: Path, prepared: Path, cfg: DistillParams) -> Compressed:
    """distill_student's scratch path with a TwinTeacher: the student at `prepared`'s size, the teacher at its own."""
    gen = make_deterministic(cfg.seed, cfg.threads)
    train, val, task = load_split(prepared, "train"), load_split(prepared, "val"), read_task(prepared)
    teacher = twin_teacher(teacher_dir, teacher_prepared, train, cfg.threads)
    student = make_student(cfg, task, None)
    result = distill(teacher, student.model, train, val, cfg, gen, task)
    record = {"mode": "distill-twins", "teacher": str(teacher_dir), "teacher_prepared": str(teacher_prepared),
              "seed": cfg.seed, "best_epoch": result.best_epoch}
    return Compressed(student.model, student.spec, task.image_size, result, record, RECORD)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--set", action="append", default=[], help="distill override, e.g. student.stem_stride=4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--teacher", type=Path, default=Path("models/teacher"))
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    ap.add_argument("--out", type=Path, default=Path(".lathe/student-sweep"))
    ap.add_argument("--teacher-prepared", type=Path,
                    help="the teacher's own prepared data (same cells at its resolution, e.g. scripts/pretrained_probe's "
                         "prepared-224): distil from its logits of each cell's twin; --teacher then holds only model.onnx")
    args = ap.parse_args()

    params = load_params(args.params)
    section = apply_overrides(params["distill"], args.set)
    quantize_cfg = QuantizeParams.model_validate(params["quantize"])
    quick_eval = EvaluateParams(latency_warmup=50, latency_runs=300, throughput_runs=1)
    check = load_split(args.prepared, "val")["images"][:16]
    task = read_task(args.prepared)
    teacher_prepared = args.teacher_prepared or args.prepared
    same_cells(load_split(teacher_prepared, "test"), load_split(args.prepared, "test"), teacher_prepared)
    teacher = evaluate_model(args.teacher, teacher_prepared, quick_eval)
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = DistillParams.model_validate({**section, "seed": seed, "threads": args.threads})
        t0 = time.perf_counter()
        if args.teacher_prepared is None:
            result = distill_student(args.teacher, args.prepared, cfg)
        else:
            result = distill_from_twins(args.teacher, args.teacher_prepared, args.prepared, cfg)
        wall = time.perf_counter() - t0
        float_dir = args.out / args.name / f"seed{seed}"
        int8_dir = float_dir / "int8"
        write_compressed(float_dir, result, check)
        write_quantized(int8_dir, quantize_model(float_dir, args.prepared, quantize_cfg))
        fp32 = evaluate_model(float_dir, args.prepared, quick_eval).metrics
        int8_result = evaluate_model(int8_dir, args.prepared, quick_eval)
        int8 = int8_result.metrics
        row = {"name": args.name, "seed": seed, "overrides": args.set, "wall_s": round(wall, 1),
               "best_epoch": result.fit.best_epoch,
               "fp32": {k: round(fp32[k], 4) for k in FIGURES}, "int8": {k: round(int8[k], 4) for k in FIGURES},
               "int8_vs_teacher": against_teacher(int8_result, teacher, task.defective_indices, task.num_classes)}
        print(json.dumps(row), flush=True)
        with open(args.out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
