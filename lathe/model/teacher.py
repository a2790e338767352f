"""Train the teacher and write its artifacts: weights, architecture JSON, ONNX, history."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from lathe.data.contract import Task, read_task
from lathe.data.ingest import load_split
from lathe.determinism import make_deterministic, numerics_record
from lathe.errors import ConfigError, DataError, LatheError
from lathe.io import printable, write_bytes, write_json
from lathe.model.arch import build_model, count_params
from lathe.model.export import export_onnx, max_abs_diff_vs_torch, save_onnx
from lathe.model.lite import LiteNet, lite_network
from lathe.model.params import ArchSpec, LiteSpec, TrainParams, arch_mismatches
from lathe.model.pretrained import load_pretrained, pretrained_source
from lathe.model.train import (
    LossFn,
    Progress,
    TrainResult,
    class_weights,
    ensemble_teacher,
    fit,
    kd_loss,
    memoized_teacher,
    to_tensor,
)
from lathe.workers import map_jobs

log = logging.getLogger(__name__)
ONNX_TOLERANCE = 1e-4  # max |onnxruntime - torch| on logits
# What a written model folder records of that check: only the limit it passed (the measured figure depends
# on onnxruntime's kernels for the CPU, and the files must be the same on every machine).
ONNX_CHECK = {"max_abs_diff_limit": ONNX_TOLERANCE, "passed": True}


@dataclass(frozen=True)
class ModelArtifacts:
    """File names inside a model folder (models/<variant>/)."""

    weights: str = "weights.safetensors"
    arch: str = "arch.json"
    onnx: str = "model.onnx"
    summary: str = "train.json"


FILES = ModelArtifacts()


def check_trainable(train: dict[str, np.ndarray], val: dict[str, np.ndarray], num_classes: int) -> None:
    """Refuse data the model cannot learn from, naming what is missing."""
    if len(train["labels"]) < 2:
        raise DataError(f"train split has {len(train['labels'])} sample(s); need at least 2")
    if len(val["labels"]) == 0:
        raise DataError("val split is empty; model selection needs validation samples")
    bad = sorted(set(np.unique(train["labels"]).tolist()) - set(range(num_classes)))
    if bad:
        raise DataError(f"train labels {bad} are outside 0..{num_classes - 1}")


SpecT = TypeVar("SpecT", bound=ArchSpec | LiteSpec)


def spec_for_task(spec: SpecT, task: Task, key: str) -> SpecT:
    """`spec` with the data's input channels and class count. A value params set explicitly (`key`, e.g.
    train_teacher.arch) must agree with the data: it is then a check, not a second source of the fact."""
    for field, said, value, origin in arch_mismatches(spec, task.channels, task.num_classes):
        raise ConfigError(f"{key}.{field} is {said} but the data has {value} ({origin}); "
                          f"drop {key}.{field}: it comes from the data")
    return cast(SpecT, spec.model_copy(update={"in_channels": task.channels, "num_classes": task.num_classes}))


def train_teacher(prepared_dir: Path, cfg: TrainParams, progress: Progress | None = None) -> tuple[nn.Module, TrainResult, int]:
    """Deterministically train the teacher on the train split, selecting on val.

    With `ensemble.members` > 1, the members are trained first (seeds seed, seed + 1, ...), then a
    fresh network (seed + members) learns from their averaged prediction plus the labels; that
    network is the teacher. `result.members` holds each member's best val scores. Progress rows
    carry `member` (1-based) while a member trains, and `member` 0 for the distilled teacher.
    """
    task = read_task(prepared_dir)
    cfg = cfg.model_copy(update={"arch": spec_for_task(cfg.arch, task, "train_teacher.arch")})
    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    check_trainable(train, val, task.num_classes)
    image_size = task.image_size
    k = cfg.ensemble.members
    if k == 1:
        return *train_one(train, val, cfg, cfg.seed, task, progress), image_size
    jobs = [(str(prepared_dir), cfg.model_dump_json(), cfg.seed + i, i + 1) for i in range(k)]
    outs = map_jobs(train_member, jobs, cfg.ensemble.parallel, progress)
    members = [member_from_job(cfg.arch, image_size, out) for out in outs]
    weights = class_weights(train["labels"], cfg.arch.num_classes, cfg.class_weighting)
    teacher = memoized_teacher(ensemble_teacher([m for m, _ in members]), to_tensor(train["images"]))
    loss = kd_loss(teacher, cfg.ensemble.temperature, cfg.ensemble.alpha, weights, cfg.label_smoothing)
    distilled_cfg = cfg.model_copy(update={"epochs": cfg.ensemble.epochs or cfg.epochs,
                                           "threads": cfg.ensemble.threads or cfg.threads})
    model, result = train_one(train, val, distilled_cfg, cfg.seed + k, task, tagged(progress, 0), loss)
    result.members = [r.best_val for _, r in members]
    return model, result, image_size


def train_one(train: dict[str, np.ndarray], val: dict[str, np.ndarray], cfg: TrainParams, seed: int, task: Task,
              progress: Progress | None = None, loss_fn: LossFn | None = None) -> tuple[nn.Module, TrainResult]:
    """One network of `cfg.arch` trained from the seed's initialisation (weighted CE by default)."""
    gen = make_deterministic(seed, cfg.threads)
    model = new_network(cfg.arch, task.image_size)
    if isinstance(model, LiteNet) and isinstance(cfg.arch, LiteSpec) and cfg.arch.memoize_frozen \
            and cfg.arch.frozen_blocks >= 0:
        model.memoize_frozen(torch.cat([to_tensor(train["images"]), to_tensor(val["images"])]))
    result = fit(model, train, val, cfg, gen, task, loss_fn=loss_fn, progress=progress)
    if isinstance(model, LiteNet):
        model.unfreeze()  # trained: a plain network from here on (no memo for export to trace, every layer counted)
    return model, result


def new_network(spec: ArchSpec | LiteSpec, image_size: int) -> nn.Module:
    """A network of `spec` as training starts it: a ResNetLike at the seed's initialisation, or a LiteNet on its
    pinned ImageNet weights (checked against their sha256 before they are read) with a new head."""
    if isinstance(spec, LiteSpec):
        state, _ = load_pretrained(spec.weights)
        return lite_network(spec, image_size, state, frozen_blocks=spec.frozen_blocks)
    return build_model(spec, image_size)


def rebuild_network(spec: ArchSpec | LiteSpec, image_size: int, state: dict[str, torch.Tensor]) -> nn.Module:
    """The trained network of `spec` with weights `state` (a model folder's or a member's), in eval mode."""
    model = lite_network(spec, image_size, state) if isinstance(spec, LiteSpec) else build_model(spec, image_size)
    model.load_state_dict(state)
    return model.eval()


def train_member(prepared_dir: str, cfg_json: str, seed: int, member: int, progress: Progress) -> tuple[bytes, dict]:
    """One ensemble member, as a `lathe.workers` job: its safetensors bytes and its training record.

    Loads the splits itself (children share nothing with the stage but arguments); the bytes depend
    on `seed` and `cfg` (threads included) only, not on the process that ran it.
    """
    cfg = TrainParams.model_validate_json(cfg_json)
    train, val = load_split(Path(prepared_dir), "train"), load_split(Path(prepared_dir), "val")
    model, result = train_one(train, val, cfg, seed, read_task(Path(prepared_dir)), tagged(progress, member))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    record = {"history": result.history, "best_epoch": result.best_epoch, "best_val": result.best_val}
    return save_tensors(state), record


def member_from_job(spec: ArchSpec | LiteSpec, image_size: int,
                    out: tuple[bytes, dict]) -> tuple[nn.Module, TrainResult]:
    """The (model, result) of `train_member`'s output, the model rebuilt in eval mode."""
    weights, record = out
    model = rebuild_network(spec, image_size, load_tensors(weights))
    return model, TrainResult(model=model, **record)


def tagged(progress: Progress | None, member: int) -> Progress | None:
    """`progress` with `member` added to every row (0: the distilled teacher)."""
    if progress is None:
        return None
    return lambda row: progress({**row, "member": member})


def arch_document(spec: ArchSpec | LiteSpec, image_size: int) -> dict:
    """The JSON that rebuilds the network by code (`load_model`; no pickled modules). A network grown from
    pretrained weights names them and their pinned sha256: where the teacher started is part of its record."""
    doc = {"family": spec.family, "image_size": image_size, "spec": spec.model_dump()}
    if isinstance(spec, LiteSpec):
        doc["pretrained"] = {"name": spec.weights, "sha256": pretrained_source(spec.weights).sha256}
    return doc


SPEC_OF_FAMILY: dict[str, type[ArchSpec] | type[LiteSpec]] = {"resnet_like": ArchSpec, "efficientnet_lite": LiteSpec}


def load_model(model_dir: Path, role: str = "model") -> nn.Module:
    """Rebuild a model from arch.json + weights.safetensors; every failure names the folder or file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LatheError(f"{model_dir}: {role} folder not found (run the stage that writes it first)")
    arch, weights = model_dir / FILES.arch, model_dir / FILES.weights
    try:
        doc = json.loads(arch.read_text())
    except FileNotFoundError as exc:
        raise LatheError(f"{arch}: {role} file missing") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LatheError(f"{arch}: {role} architecture is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or not {"spec", "image_size"} <= set(doc):
        raise LatheError(f"{arch}: expected a JSON object with keys 'spec' and 'image_size'")
    family = doc.get("family", "resnet_like")
    if not isinstance(family, str) or family not in SPEC_OF_FAMILY:
        raise LatheError(f"{arch}: unknown family {printable(repr(family))}; known: {', '.join(SPEC_OF_FAMILY)}")
    try:
        spec = SPEC_OF_FAMILY[family].model_validate(doc["spec"])
    except ValidationError as exc:
        first = exc.errors()[0]
        raise LatheError(f"{arch}: invalid 'spec': {first['msg']} at {'.'.join(str(p) for p in first['loc'])}") from exc
    try:
        model = rebuild_network(spec, int(doc["image_size"]), load_tensors(weights.read_bytes()))
    except FileNotFoundError as exc:
        raise LatheError(f"{exc.filename}: {role} file missing") from exc
    except SafetensorError as exc:
        raise LatheError(f"{weights}: unreadable safetensors file ({exc})") from exc
    except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as exc:  # the weights' own shapes build a LiteNet
        reason = printable(" ".join(str(exc).split()), 300)  # torch's size-mismatch list spans lines: one line here
        raise LatheError(f"{model_dir}: cannot rebuild the {role} from {arch.name} + {weights.name} ({reason})") from exc
    return model


def history_csv(history: list[dict]) -> str:
    """Training history as CSV for `dvc plots`."""
    if not history:
        return ""
    cols = list(history[0])
    lines = [",".join(cols)] + [",".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in cols) for row in history]
    return "\n".join(lines) + "\n"


def write_model_dir(out_dir: Path, model: nn.Module, spec: ArchSpec | LiteSpec, image_size: int, result: TrainResult,
                    check_images: np.ndarray) -> dict:
    """Write weights, arch, ONNX (checked against torch) and history; returns the summary."""
    out_dir = Path(out_dir)
    onnx_bytes = export_onnx(model, image_size, spec.in_channels)
    diff = max_abs_diff_vs_torch(model, onnx_bytes, to_tensor(check_images).numpy())
    if diff > ONNX_TOLERANCE:
        raise LatheError(f"ONNX export differs from torch by {diff:.2e} (> {ONNX_TOLERANCE}); not writing {out_dir}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_bytes(out_dir / FILES.weights, save_tensors(state))
    write_json(out_dir / FILES.arch, arch_document(spec, image_size))
    save_onnx(out_dir / FILES.onnx, onnx_bytes)
    log.info("ONNX export matches torch: max |onnxruntime - torch| %.2e on %d check images (limit %g)",
             diff, len(check_images), ONNX_TOLERANCE)
    # The measured difference depends on onnxruntime's kernels for this CPU, so only the limit it
    # passed enters the file (whose bytes must be the same on every machine); the figure is logged.
    summary = {"params": count_params(model), "best_epoch": result.best_epoch,
               "best_val": {k: round(v, 6) for k, v in result.best_val.items()},
               "onnx_check": dict(ONNX_CHECK), "epochs_run": len(result.history),
               "numerics": numerics_record()}
    if result.members:
        summary["ensemble_members_best_val"] = [{k: round(v, 6) for k, v in m.items()} for m in result.members]
    write_json(out_dir / FILES.summary, summary)
    return summary
