"""Teacher recipe sweep: train the teacher with params overrides over several seeds, score on test.

Not part of the pipeline. It reuses the pipeline's own code (ingest, train, ONNX export, onnxruntime
evaluation), so a row here is what `train_teacher` + `evaluate` would report for that recipe.

    python -m scripts.teacher_sweep --name k7s4-128 --image-size 128 \
        --set arch.stem_kernel=7 --set arch.stem_stride=4 --seeds 0,1,2 --threads 1

Rows are appended as JSON lines to --out/results.jsonl. Test figures are for reporting only: pick
recipes on val (the pipeline does), or the test split stops being an honest estimate.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

import stages  # noqa: F401  the pipeline's numeric pins (lathe.determinism), as every stage runs under
from lathe.config import load_params
from lathe.data.contract import TASK_FILE, DataParams
from lathe.data.ingest import ingest, load_split, write_prepared
from lathe.data.params import IngestParams
from lathe.measure.evaluate import evaluate_model
from lathe.measure.params import EvaluateParams
from lathe.model.params import TrainParams
from lathe.model.teacher import train_teacher, write_model_dir


def prepared_at(raw_dir: Path, cache: Path, image_size: int, base: IngestParams, data: DataParams) -> Path:
    """data/prepared for `image_size` (the pipeline's data contract, split seed and fractions), built once."""
    out = cache / f"prepared-{image_size}"
    if not (out / TASK_FILE).is_file():
        cfg = base.model_copy(update={"image_size": image_size})
        rows, images, task = ingest(raw_dir, cfg, data)
        write_prepared(out, rows, images, task)
    return out


def apply_overrides(section: dict, pairs: list[str]) -> dict:
    """`a.b=value` (value parsed as YAML) into a nested copy of the params section."""
    out = json.loads(json.dumps(section))
    for pair in pairs:
        key, _, raw = pair.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--image-size", type=int, default=None, help="default: params.yaml ingest.image_size")
    ap.add_argument("--set", action="append", default=[], help="train_teacher override, e.g. epochs=12")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--out", type=Path, default=Path(".lathe/sweep"))
    ap.add_argument("--prepared", type=Path, default=None,
                    help="a prepared folder to train on as it is (e.g. from scripts/input_variants.py); "
                         "default: ingest --raw at --image-size, cached under --out")
    args = ap.parse_args()

    params = load_params(args.params)
    base_ingest = IngestParams.model_validate(params["ingest"])
    data = DataParams.model_validate(params["data"])
    prepared = args.prepared or prepared_at(args.raw, args.out, args.image_size or base_ingest.image_size,
                                            base_ingest, data)
    section = apply_overrides(params["train_teacher"], args.set)
    quick_eval = EvaluateParams(latency_warmup=1, latency_runs=5, throughput_runs=1)
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = TrainParams.model_validate({**section, "seed": seed, "threads": args.threads})
        t0 = time.perf_counter()
        model, result, image_size = train_teacher(prepared, cfg)
        wall = time.perf_counter() - t0
        model_dir = args.out / args.name / f"seed{seed}"
        write_model_dir(model_dir, model, model.spec, image_size, result, load_split(prepared, "val")["images"][:16])
        m = evaluate_model(model_dir, prepared, quick_eval).metrics
        row = {"name": args.name, "seed": seed, "image_size": image_size, "overrides": args.set,
               "wall_s": round(wall, 1), "best_epoch": result.best_epoch,
               "val_accuracy": round(result.best_val["accuracy"], 4),
               **{k: round(m[k], 4) for k in ("accuracy", "balanced_accuracy", "defective_recall", "defective_roc_auc",
                                                  "macs", "params")}}
        print(json.dumps(row), flush=True)
        with open(args.out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
