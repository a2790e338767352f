"""`make bench`: pipeline INT8 variants vs the FP32 teacher and do-it-yourself baselines -> reports/bench.{json,md}.

Usage: python -m bench.run [--teacher models/teacher] [--quantized models/quantized] [--qat models/qat]
                           [--pruned-baseline models/baselines/pruned_50] [--prepared data/prepared]
                           [--out reports] [--work DIR] [--params params.yaml] [--strict]

Pipeline INT8 variants are every `model.onnx` under --quantized (post-training, the quantize stage) and
--qat (quantization-aware fine-tuning, the qat stage; skipped with a note when absent). The onnxruntime dynamic and
default-static baselines are built from the teacher into --work (a temporary folder unless given).
The "50% channel pruning + fine-tune" baseline is the prune stage's output at --pruned-baseline; if
it is missing, that row is skipped with a note on stderr and in bench.md.

Reads params.yaml sections `bench` (timing, acceptance targets), `quantize` (seed and
calibration_size, so the static baseline calibrates on the same train images as the pipeline) and
the task from data/prepared/task.json (so recall means what the evaluate stage means by it).
Not a DVC stage: it measures the machine it runs on, so its outputs are not cached.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lathe.compress.params import QuantizeParams
from lathe.config import load_params, parse_section
from lathe.data.ingest import load_split
from lathe.errors import LatheError
from lathe.io import write_json, write_text
from lathe.measure.bench import BenchModel, run_bench
from lathe.measure.bench_baselines import (
    BASELINE_PRUNED,
    build_baselines,
    calibration_subset,
    describe_pruned_baseline,
)
from lathe.measure.bench_report import bench_markdown
from lathe.measure.ort import MODEL_FILE
from lathe.measure.params import BenchParams

log = logging.getLogger("bench")


def pipeline_variants(quantized_dir: Path, stage: str = "quantize") -> list[BenchModel]:
    """Every model.onnx under `quantized_dir`, named like the evaluate stage's variants (quantized/<sub>, qat/<sub>)."""
    found = sorted(Path(quantized_dir).rglob(MODEL_FILE))
    if not found:
        raise LatheError(f"{quantized_dir}: no {MODEL_FILE} found; the bench compares the pipeline's INT8 variants, "
                         f"run the {stage} stage first (dvc repro)")
    models = []
    for path in found:
        rel = path.parent.relative_to(quantized_dir).as_posix()
        name = Path(quantized_dir).name if rel == "." else f"{Path(quantized_dir).name}/{rel}"
        models.append(BenchModel(name, "pipeline", path, f"{path}: the pipeline's {stage} stage"))
    return models


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher"), help="folder with the FP32 model.onnx")
    parser.add_argument("--quantized", type=Path, default=Path("models/quantized"), help="pipeline INT8 variants (PTQ)")
    parser.add_argument("--qat", type=Path, default=Path("models/qat"), help="pipeline INT8 variants (QAT)")
    parser.add_argument("--pruned-baseline", type=Path, default=Path("models/baselines/pruned_50"),
                        help="folder with model.onnx of 50%% channel pruning + fine-tune alone (prune stage output)")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="train/test splits")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="bench.json and bench.md go here")
    parser.add_argument("--work", type=Path, default=None, help="keep the built baseline models here")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--strict", action="store_true", help="exit 2 when the acceptance check fails")
    return parser.parse_args(argv)


def bench(args: argparse.Namespace, work_dir: Path) -> dict:
    params = load_params(args.params)
    cfg = parse_section(params, "bench", BenchParams, str(args.params))
    quant = parse_section(params, "quantize", QuantizeParams, str(args.params))

    teacher = BenchModel("teacher", "teacher", args.teacher / MODEL_FILE, f"{args.teacher / MODEL_FILE}: FP32")
    if not teacher.onnx_path.is_file():
        raise LatheError(f"{teacher.onnx_path}: teacher model not found (run the train_teacher stage)")
    pipeline, notes = pipeline_variants(args.quantized), []
    if args.qat.is_dir():
        pipeline += pipeline_variants(args.qat, "qat")
    else:
        notes.append(f"no QAT variants: {args.qat} not found (the qat stage writes it)")
    calibration = calibration_subset(load_split(args.prepared, "train")["images"], quant.calibration_size, quant.seed)
    baselines = build_baselines(teacher.onnx_path, work_dir, calibration)
    pruned = args.pruned_baseline / MODEL_FILE
    if pruned.is_file():
        origin, note = describe_pruned_baseline(args.pruned_baseline)
        baselines.append(BenchModel(BASELINE_PRUNED, "baseline", pruned, origin))
        notes += [note] if note else []
    else:
        notes.append(f"baseline {BASELINE_PRUNED} skipped: {pruned} not found (make it with the prune stage at "
                     "ratio 0.5 by channels and pass its folder with --pruned-baseline)")
    for note in notes:
        print(f"[bench] NOTE: {note}", file=sys.stderr)

    report = run_bench([teacher, *pipeline, *baselines], args.prepared, cfg, notes)
    write_text(args.out / "bench.md", bench_markdown(report))
    write_json(args.out / "bench.json", report)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # Our progress at INFO; other libraries (onnxruntime's quantizer logs per tensor at INFO) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="[bench] %(message)s", stream=sys.stderr)
    for name in ("bench", "lathe"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        if args.work is not None:
            report = bench(args, args.work)
        else:
            with tempfile.TemporaryDirectory(prefix="lathe-bench-") as tmp:
                report = bench(args, Path(tmp))
    except LatheError as exc:
        print(f"[bench] FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
    acc = report["acceptance"]
    for c in acc["criteria"]:
        print(f"[bench] {'PASS' if c['passed'] else 'FAIL'}  {c['name']}: "
              f"{c['detail'] if c['value'] is None else c['value']} (target {c['target']})")
    print(f"[bench] acceptance of {acc['variant']} vs {acc['teacher']}: {'PASS' if acc['passed'] else 'FAIL'} "
          f"-> {args.out / 'bench.md'}, {args.out / 'bench.json'}")
    if args.strict and not acc["passed"]:
        sys.exit(2)


if __name__ == "__main__":
    main()
