"""Deterministic supervised training of a classifier on prepared EL cell images."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lathe.data.contract import Task
from lathe.measure.metrics import accuracy, balanced_accuracy, binary_defect_metrics, confusion_matrix
from lathe.model.params import AugmentParams, FitParams

Progress = Callable[[dict], None]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, S, S) or (N, C, S, S) uint8 -> (N, C, S, S) float32 in [0, 1]."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return x.unsqueeze(1) if x.ndim == 3 else x


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> torch.Tensor:
    """Loss weights against class imbalance, normalised to mean 1 over present classes."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if mode == "none":
        w = np.ones(num_classes)
    else:
        inv = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
        w = np.sqrt(inv) if mode == "sqrt_inverse" else inv
    present = counts > 0
    w = w / w[present].mean() if present.any() else w
    return torch.tensor(w, dtype=torch.float32)


def augment(x: torch.Tensor, cfg: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """Label-preserving EL augmentations on a batch (N, 1, S, S) in [0, 1].

    Cells are near-symmetric, so flips keep the label; gain/contrast mimic exposure changes
    between EL imaging stations; small shifts mimic cell segmentation jitter.
    """
    n = x.shape[0]

    def coin() -> torch.Tensor:
        return (torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1)

    if cfg.hflip:
        x = torch.where(coin(), x.flip(3), x)
    if cfg.vflip:
        x = torch.where(coin(), x.flip(2), x)
    if cfg.rot180:
        x = torch.where(coin(), x.flip(2).flip(3), x)
    if cfg.rot90:
        x = torch.where(coin(), x.transpose(2, 3), x)  # with the flips above: all 8 symmetries
    if cfg.brightness > 0 or cfg.contrast > 0:
        gain = 1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * cfg.brightness
        mean = x.mean(dim=(2, 3), keepdim=True)
        con = 1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * cfg.contrast
        x = ((x - mean) * con + mean) * gain
    if cfg.max_shift_px > 0:
        s = cfg.max_shift_px
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        dx, dy = (int(v) for v in torch.randint(0, 2 * s + 1, (2,), generator=gen))
        x = padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    return x.clamp(0, 1)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits (N, K) in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def score(logits: torch.Tensor, labels: np.ndarray, task: Task) -> dict[str, float]:
    """Accuracy, balanced accuracy and defective recall (task.defective) of logits against labels."""
    pred = logits.argmax(1).numpy()
    cm = confusion_matrix(labels, pred, task.num_classes)
    return {
        "accuracy": accuracy(cm),
        "balanced_accuracy": balanced_accuracy(cm),
        "defective_recall": binary_defect_metrics(labels, pred, task.defective_indices)["defective_recall"],
    }


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val: dict = field(default_factory=dict)
    members: list[dict] = field(default_factory=list)  # ensemble members' best val scores, if any


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TeacherFn = Callable[[torch.Tensor], torch.Tensor]  # (N, C, S, S) float32 -> (N, K) logits


def cross_entropy_loss(weights: torch.Tensor, smoothing: float) -> LossFn:
    """Weighted, label-smoothed cross-entropy; the extra argument (inputs) is unused."""

    def loss(logits: torch.Tensor, target: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=weights, label_smoothing=smoothing)

    return loss


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T
    changes (Hinton et al. 2015, section 2). Teacher logits are detached: no gradient reaches them.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    # KL written out with softmax, not F.kl_div(log_target=True): that one calls exp() on a large
    # contiguous tensor, which goes through MKL's vector math and differs between CPU vendors
    # (lathe.determinism). softmax uses ATen's own pinned kernel. (N, K) -> scalar, batch mean.
    p_teacher = F.softmax(teacher_logits.detach() / t, dim=1)
    kl = (p_teacher * (log_p_teacher - log_p_student)).sum(dim=1).mean()
    return kl * (t * t)


def frozen_teacher(teacher: nn.Module) -> TeacherFn:
    """The teacher as a logits function: eval mode (no dropout, BN running stats), no autograd graph."""

    def logits(x: torch.Tensor) -> torch.Tensor:
        teacher.eval()
        with torch.no_grad():
            return teacher(x)

    return logits


def kd_loss(teacher_logits: TeacherFn, temperature: float, alpha: float, weights: torch.Tensor,
            smoothing: float) -> LossFn:
    """alpha * soft_loss(student, teacher(x), T) + (1 - alpha) * weighted, smoothed CE on the labels.

    A `LossFn` for `lathe.model.train.fit`: `x` is the augmented batch the student saw, so the teacher
    judges exactly the same pixels. `teacher_logits` may also return precomputed logits (tests).
    Class weights apply to the label term only; the soft term follows the teacher's distribution.
    """
    hard = cross_entropy_loss(weights, smoothing)
    last: list[tuple[torch.Tensor, torch.Tensor]] = []  # (batch, teacher logits): mixup asks twice per batch

    def judged(x: torch.Tensor) -> torch.Tensor:
        if not last or last[0][0] is not x:
            last[:] = [(x, teacher_logits(x))]
        return last[0][1]

    def loss(logits: torch.Tensor, target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if alpha == 0:  # skip the teacher's forward pass; the loss is then exactly the control's
            return hard(logits, target, x)
        soft = alpha * soft_loss(logits, judged(x), temperature)
        if alpha == 1:  # the labels play no part: skip their term (mixup then needs no second label)
            return soft
        return soft + (1 - alpha) * hard(logits, target, x)

    return loss


def ensemble_teacher(members: list[nn.Module]) -> TeacherFn:
    """Several networks as one teacher: the mean of their log-probabilities (a geometric mean of
    their predicted distributions), in eval mode, with no autograd graph. (N, C, S, S) -> (N, K)."""
    frozen = [frozen_teacher(m) for m in members]

    def logits(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.log_softmax(f(x), dim=1) for f in frozen]).mean(0)

    return logits


def memoized_teacher(teacher: TeacherFn, inputs: torch.Tensor, batch_size: int = 256) -> TeacherFn:
    """`teacher` with its logits for every row of `inputs` (N, C, S, S) computed once, up front.

    Distillation asks for the teacher's logits of every batch in every epoch; without augmentation
    those are the same images each epoch, so an ensemble's forward passes are paid once instead of
    once per epoch. A batch with any row not seen up front (an augmented one) is computed afresh.
    Rows are looked up by their bytes, so a hit returns the up-front logits of exactly those pixels
    (equal to a fresh forward pass up to the last bits, which may depend on the batch size).
    """
    cache: dict[bytes, torch.Tensor] = {}
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i : i + batch_size]
        for row, out in zip(chunk, teacher(chunk)):
            cache[row.numpy().tobytes()] = out

    def logits(x: torch.Tensor) -> torch.Tensor:
        rows = [cache.get(r.numpy().tobytes()) for r in x]
        if any(r is None for r in rows):
            return teacher(x)
        return torch.stack(rows)

    return logits


def make_optimizer(model: nn.Module, cfg: FitParams) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum; the fused single-kernel step, whose bits are the same on
    every x86-64 CPU under the pins (the default foreach step is not: lathe.determinism)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                               weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def selection_score(val: dict[str, float], select_on: str = "score") -> float:
    """Model selection on val. "score": accuracy plus a quarter each of balanced accuracy and
    defective recall; "accuracy": accuracy alone (ties go to the earlier epoch)."""
    if select_on == "accuracy":
        return val["accuracy"]
    return val["accuracy"] + 0.25 * val["balanced_accuracy"] + 0.25 * val["defective_recall"]


def fit(
    model: nn.Module,
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    cfg: FitParams,
    gen: torch.Generator,
    task: Task,
    loss_fn: LossFn | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train `model` with AdamW + one-cycle cosine LR; keep the weights that score best on val.

    `loss_fn(logits, target, x)` defaults to weighted cross-entropy; distillation passes its own.
    """
    # NHWC ("channels_last") tensors take oneDNN's faster conv kernels on CPU: about 1.5x per epoch
    # here, and still deterministic for a fixed thread count. The model leaves `fit` in the default
    # layout, so export, pruning and safetensors see ordinary contiguous weights.
    layout = memory_layout(model)
    model.to(memory_format=layout)
    x_train, y_train = to_layout(to_tensor(train["images"]), layout), torch.from_numpy(train["labels"])
    x_val = to_layout(to_tensor(val["images"]), layout)
    if loss_fn is None:
        loss_fn = cross_entropy_loss(class_weights(train["labels"], task.num_classes, cfg.class_weighting), cfg.label_smoothing)
    opt = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    ema = copy.deepcopy(model) if cfg.ema_decay > 0 else None
    result = TrainResult(model=model)
    best_state, best_score = copy.deepcopy(model.state_dict()), -math.inf
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            xb, yb = augment(x_train[idx], cfg.augment, gen), y_train[idx]
            if cfg.mixup > 0:
                lam, partner = mixup_draw(len(idx), cfg.mixup, gen)
                xb = to_layout(lam * xb + (1 - lam) * xb[partner], layout)
                logits = model(xb)
                loss = lam * loss_fn(logits, yb, xb) + (1 - lam) * loss_fn(logits, yb[partner], xb)
            else:
                xb = to_layout(xb, layout)
                loss = loss_fn(model(xb), yb, xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.sam_rho > 0:
                sharpness_aware_gradient(model, loss_fn, xb, yb, cfg.sam_rho)
            opt.step()
            sched.step()
            if ema is not None:
                update_ema(ema, model, cfg.ema_decay)
            total += loss.item() * len(idx)
            seen += len(idx)
        judged = ema if ema is not None else model
        val_scores = score(predict_logits(judged, x_val), val["labels"], task)
        row = {"epoch": epoch, "train_loss": round(total / max(seen, 1), 6), "lr": sched.get_last_lr()[0],
               **{f"val_{k}": round(v, 6) for k, v in val_scores.items()}}
        result.history.append(row)
        s = selection_score(val_scores, cfg.select_on)
        if s > best_score:
            best_score, result.best_epoch, result.best_val = s, epoch, val_scores
            best_state = copy.deepcopy(judged.state_dict())
        if progress is not None:
            progress(row)
    model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return result


def sharpness_aware_gradient(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, rho: float) -> None:
    """Replace the gradients in `model` (those of `loss_fn` on the batch at the weights w) by the gradient at
    w + rho * g / |g|, the nearly worst point within L2 radius `rho` (SAM, Foret et al. 2021); the
    weights are restored, and BatchNorm's running statistics are not updated by the second pass."""
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        steps = [p.grad * (rho / (norm + 1e-12)) for p in params]
        for p, e in zip(params, steps, strict=True):
            p.add_(e)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        for p in params:
            p.grad = None
        loss_fn(model(x), y, x).backward()
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        with torch.no_grad():
            for p, e in zip(params, steps, strict=True):
                p.sub_(e)


def mixup_draw(n: int, concentration: float, gen: torch.Generator) -> tuple[float, torch.Tensor]:
    """mixup's blend ratio lam ~ Beta(a, a) and a partner permutation of the batch's n rows.

    torch's Beta sampler takes no generator, so lam comes from numpy's, seeded by a draw from `gen`:
    the run stays a function of its seed alone. numpy's sampler calls libm's log and exp; glibc picks
    the same (FMA) variant on the AMD and Intel CPUs named in lathe.determinism, but a mixup run has
    not yet been rebuilt across vendors (off by default, so no pipeline model depends on it).
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    lam = float(np.random.default_rng(seed).beta(concentration, concentration))
    return lam, torch.randperm(n, generator=gen)


def memory_layout(model: nn.Module) -> torch.memory_format:
    """channels_last when every conv has a multiple of 8 output channels (so every input but the
    image's too), else contiguous.

    Under the pinned oneDNN (AVX2, lathe.determinism) channels_last with other channel counts (a
    pruned network's 7 or 14) reaches a 1x1 backward-weights kernel that corrupts the heap (torch
    2.13's oneDNN; "double free or corruption" in loss.backward()); the NCHW kernels do not.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if convs and all(m.out_channels % 8 == 0 for m in convs):
        return torch.channels_last
    return torch.contiguous_format


def to_layout(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """(N, C, S, S) in `layout` (same shape and values)."""
    return x.contiguous(memory_format=layout)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Exponential moving average of parameters; buffers (BN statistics) are copied."""
    for e, m in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(m.detach(), alpha=1 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)
