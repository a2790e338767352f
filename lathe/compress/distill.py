"""Knowledge distillation (Hinton et al. 2015) of the teacher into a small student, and its control.

The control trains the same student (same init, seed, batches, augmentation and budget) with plain
cross-entropy and no teacher, so the benefit of distillation is measured rather than assumed: with
alpha = 0 a distilled student is bit-identical to its control.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lathe.compress.params import DistillParams
from lathe.compress.result import Compressed
from lathe.data.contract import Task, read_task
from lathe.data.ingest import load_split
from lathe.determinism import make_deterministic
from lathe.errors import ConfigError, LatheError
from lathe.io import sha256_file
from lathe.model.arch import build_model, count_params
from lathe.model.params import ArchSpec, LiteSpec
from lathe.model.teacher import FILES, ONNX_CHECK, check_trainable, load_model, spec_for_task
from lathe.model.train import (
    Progress,
    TrainResult,
    class_weights,
    fit,
    frozen_teacher,
    kd_loss,
    memoized_teacher,
    predict_logits,
    score,
    to_tensor,
)

log = logging.getLogger(__name__)

RECORD = "distill.json"  # what distillation (or the control) did, beside FILES.summary
STUDENT_KEY = "distill.student"  # the params key that describes a scratch student

def distill(teacher: nn.Module, student: nn.Module, train: dict[str, np.ndarray], val: dict[str, np.ndarray],
            cfg: DistillParams, gen: torch.Generator, task: Task, progress: Progress | None = None) -> TrainResult:
    """Train `student` on `train` against the frozen `teacher`'s soft targets plus the labels; select on val."""
    weights = class_weights(train["labels"], task.num_classes, cfg.class_weighting)
    # The teacher's logits of the un-augmented train images are computed once, not every epoch: its
    # forward pass is ~10x the student's training step (measured: the stage took 2.6x the control).
    teacher_logits = memoized_teacher(frozen_teacher(teacher), to_tensor(train["images"]))
    loss = kd_loss(teacher_logits, cfg.temperature, cfg.alpha, weights, cfg.label_smoothing)
    return fit(student, train, val, cfg, gen, task, loss_fn=loss, progress=progress)


def train_control(student: nn.Module, train: dict[str, np.ndarray], val: dict[str, np.ndarray], cfg: DistillParams,
                  gen: torch.Generator, task: Task, progress: Progress | None = None) -> TrainResult:
    """The control: the same student and budget trained with fit's default weighted CE, no teacher."""
    return fit(student, train, val, cfg, gen, task, progress=progress)


def load_model_dir(model_dir: Path, role: str = "model") -> tuple[nn.Module, ArchSpec | LiteSpec, int]:
    """A model folder's network (eval mode), its ArchSpec and image size; missing files are named."""
    model = load_model(model_dir, role)  # raises naming the folder, arch.json or weights if absent or bad
    return model, model.spec, model.image_size


def check_fits(spec: ArchSpec | LiteSpec, name: str, channels: int, teacher_classes: int | None = None) -> None:
    """`spec` (a params key like distill.student, or an arch.json path) must fit the data and the teacher."""
    key = f"{name}: spec" if name.endswith(".json") else name
    if spec.in_channels != channels:
        raise ConfigError(f"{key}.in_channels is {spec.in_channels} but the prepared images have {channels} channel(s)")
    if teacher_classes is not None and spec.num_classes != teacher_classes:
        raise ConfigError(f"{key}.num_classes is {spec.num_classes} but the teacher predicts {teacher_classes} classes")


def check_smaller(student_params: int, teacher_params: int, name: str, teacher_dir: Path) -> None:
    """Distillation is compression: the student must have fewer parameters than the teacher."""
    if student_params >= teacher_params:
        raise ConfigError(
            f"{name} has {student_params:,} parameters, not fewer than the teacher's {teacher_params:,} "
            f"({teacher_dir}); make the student smaller (widths, stem_channels, blocks)"
        )


def init_dir_for(cfg: DistillParams, init_dir: Path | None) -> Path | None:
    """The folder to start the student from: `init_dir` when `distill.init` is 'pruned', else None."""
    if cfg.init == "pruned":
        if init_dir is None:
            raise ConfigError("distill.init is 'pruned' but no pruned model folder was given (--init-dir models/pruned)")
        return Path(init_dir)
    if init_dir is not None:
        log.info("distill.init is 'scratch': %s is not used", init_dir)
    return None


@dataclass
class Student:
    """A student network before training and where its architecture came from."""

    model: nn.Module
    spec: ArchSpec
    source: str  # "distill.student", or "<init_dir>/arch.json" for a pruned start
    init_sha256: str | None = None  # weights.safetensors of the pruned start


def make_student(cfg: DistillParams, task: Task, init_dir: Path | None) -> Student:
    """Build `cfg.student` (channels and classes from the task) from scratch (global torch RNG), or load
    the pruned model in `init_dir`.

    From a pruned start `cfg.student` is ignored: the architecture is the pruned folder's arch.json.
    """
    image_size = task.image_size
    if init_dir is None:
        spec = spec_for_task(cfg.student, task, STUDENT_KEY)
        return Student(build_model(spec, image_size), spec, STUDENT_KEY)
    model, loaded, size = load_model_dir(init_dir, "pruned model")
    source = str(Path(init_dir) / FILES.arch)
    if not isinstance(loaded, ArchSpec):
        raise LatheError(f"{source}: a student starts from a resnet_like network, not {loaded.family}")
    if size != image_size:
        raise LatheError(f"{source}: built for {size} px images but the prepared data is {image_size} px")
    log.info("student starts from %s (%d params); %s is ignored", init_dir, count_params(model), STUDENT_KEY)
    return Student(model, loaded, source, sha256_file(Path(init_dir) / FILES.weights))


def _record(mode: str, cfg: DistillParams, student: Student, result: TrainResult) -> dict:
    """Fields shared by the distilled student's and the control's distill.json."""
    return {
        "mode": mode, "init": cfg.init, "student_arch_source": student.source,
        "student_arch_ignored": STUDENT_KEY if student.source != STUDENT_KEY else None,
        "init_weights_sha256": student.init_sha256, "student_params": count_params(student.model),
        "seed": cfg.seed, "epochs": cfg.epochs, "best_epoch": result.best_epoch,
        "best_val": {k: round(v, 6) for k, v in result.best_val.items()},
        "onnx_check": dict(ONNX_CHECK),  # written only if the export passes (write_model_dir raises otherwise)
    }


def distill_student(teacher_dir: Path, prepared_dir: Path, cfg: DistillParams, init_dir: Path | None = None,
                    progress: Progress | None = None) -> Compressed:
    """Load the teacher and the data, check the student against both, distill deterministically."""
    init_dir = init_dir_for(cfg, init_dir)
    # Loaded before seeding: rebuilding the teacher draws from the global RNG, and the control
    # (which has no teacher) must see the same RNG stream for the student's init and dropout.
    teacher, teacher_spec, teacher_size = load_model_dir(teacher_dir, "teacher")
    gen = make_deterministic(cfg.seed, cfg.threads)
    train, val, task = load_split(prepared_dir, "train"), load_split(prepared_dir, "val"), read_task(prepared_dir)
    image_size, channels, num_classes = task.image_size, task.channels, task.num_classes
    check_fits(teacher_spec, str(Path(teacher_dir) / FILES.arch), channels, num_classes)
    if teacher_size != image_size:
        raise LatheError(f"{Path(teacher_dir) / FILES.arch}: teacher built for {teacher_size} px images "
                         f"but the prepared data is {image_size} px")
    check_trainable(train, val, num_classes)
    student = make_student(cfg, task, init_dir)
    check_fits(student.spec, student.source, channels, num_classes)
    teacher_params, student_params = count_params(teacher), count_params(student.model)
    check_smaller(student_params, teacher_params, student.source, Path(teacher_dir))
    result = distill(teacher, student.model, train, val, cfg, gen, task, progress)
    record = _record("distill", cfg, student, result) | {
        "teacher_params": teacher_params, "compression_ratio": round(teacher_params / student_params, 3),
        "temperature": cfg.temperature, "alpha": cfg.alpha,
        "teacher_weights_sha256": sha256_file(Path(teacher_dir) / FILES.weights),
        "teacher_val": {k: round(v, 6) for k, v in
                        score(predict_logits(teacher, to_tensor(val["images"])), val["labels"], task).items()},
    }
    return Compressed(student.model, student.spec, image_size, result, record, RECORD)


def control_student(prepared_dir: Path, cfg: DistillParams, init_dir: Path | None = None,
                    progress: Progress | None = None) -> Compressed:
    """The control: the student `distill_student` would train, on the same budget, without a teacher."""
    init_dir = init_dir_for(cfg, init_dir)
    gen = make_deterministic(cfg.seed, cfg.threads)
    train, val, task = load_split(prepared_dir, "train"), load_split(prepared_dir, "val"), read_task(prepared_dir)
    student = make_student(cfg, task, init_dir)
    check_fits(student.spec, student.source, task.channels, task.num_classes)
    check_trainable(train, val, task.num_classes)
    result = train_control(student.model, train, val, cfg, gen, task, progress)
    record = _record("control", cfg, student, result) | {
        "teacher_params": None, "compression_ratio": None, "temperature": None, "alpha": None,
        "teacher_weights_sha256": None, "teacher_val": None,
    }
    return Compressed(student.model, student.spec, task.image_size, result, record, RECORD)

