"""Structured channel pruning (Li et al. 2017) with an iterative prune + fine-tune schedule.

Channels are physically removed, never masked: torch-pruning's DependencyGraph groups every layer a
channel couples (residual adds, batch norms, the next convs' inputs, the classifier's input), so one
decision shrinks all of them. A pruned ResNet is read back as a JSON-able `ArchSpec`
(`lathe.model.arch.spec_of`); a pruned EfficientNet-Lite keeps its `LiteSpec` and rebuilds from its weights'
shapes (`lathe.model.lite.LiteNet`): the expansion channels of each MBConv block (its 1x1 expansion, depthwise
conv and their BatchNorms) are a group, and so are the residual-coupled channels of each stage. Either is
rebuilt by code and fine-tuned with `lathe.model.train.fit`.

Unstructured (masked) pruning is deliberately not offered: zeroed weights leave a dense ONNX file
exactly as large and as slow as before.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from lathe.compress.params import PruneParams
from lathe.compress.result import Compressed
from lathe.data.contract import TASK_FILE, Task, read_task
from lathe.data.ingest import load_split
from lathe.determinism import make_deterministic
from lathe.errors import ConfigError, DataError, LatheError
from lathe.model.arch import LowRankConv, LowRankLinear, ResNetLike, count_macs, count_params, spec_of
from lathe.model.lite import LiteNet
from lathe.model.params import ArchSpec, LiteSpec
from lathe.model.teacher import FILES, check_trainable, load_model, rebuild_network
from lathe.model.train import Progress, TrainResult, fit, predict_logits, score, to_tensor

RECORD = "prune.json"  # what pruning did, beside FILES.summary
BISECTION_STEPS = 40  # resolution 1e-12 on the removed-channel fraction: finer than any channel step

RoundHook = Callable[[dict], None]
GroupKey = tuple[str, ...]  # names of the convs whose output channels one group sets
Prunable = ResNetLike | LiteNet  # the families a teacher can be (lathe.model.params.TeacherSpec)

# One registry from params names to torch-pruning Importance objects (convention 4: swappable).
# Magnitude importance scores a channel by sum |w|^p of its weights in each coupled layer (the
# filters that write it, its BN scales, the next convs' input slices), averaged over those layers:
# with p=1 this is Li et al.'s filter L1 norm extended to residual-coupled groups.
IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "random": tp.importance.RandomImportance,  # a control; draws from torch's seeded global RNG
}


def make_importance(name: str) -> tp.importance.Importance:
    """The torch-pruning Importance object for a params name (l1 | l2 | random)."""
    factory = IMPORTANCES.get(name)
    if factory is None:
        raise ConfigError(f"prune.importance: unknown {name!r}; choose one of {', '.join(IMPORTANCES)}")
    return factory()


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together."""

    root: str  # the conv leading the group, e.g. "stem.0"
    convs: GroupKey  # every conv whose output channels the group sets (coupled by residual adds)
    channels: int  # current size
    inputs: GroupKey = ()  # every dense (groups 1) conv or linear whose input channels the group sets


@dataclass(frozen=True)
class MacTerm:
    """One conv or linear layer's MACs per image as a function of the groups' channel counts:
    outputs x inputs per output x positions (kernel area x output pixels; 1 for a linear)."""

    out_key: GroupKey | None  # the group setting its output channels, or None: fixed at `outputs`
    outputs: int
    in_key: GroupKey | None  # the group setting its input channels, or None: fixed at `inputs` (depthwise: 1)
    inputs: int
    positions: int

    def macs(self, counts: dict[GroupKey, int]) -> int:
        outputs = self.outputs if self.out_key is None else counts[self.out_key]
        inputs = self.inputs if self.in_key is None else counts[self.in_key]
        return outputs * inputs * self.positions


def classifier(model: Prunable) -> nn.Module:
    """The final Linear: its outputs are the classes, never pruned."""
    return model._fc if isinstance(model, LiteNet) else model.head


def described(model: Prunable) -> tuple[ArchSpec | LiteSpec, int]:
    """`model`'s spec and input size, as its arch.json records them (a LiteNet built outside `lite_network`
    has neither, and is no pipeline model)."""
    if model.spec is None or model.image_size is None:
        raise LatheError(f"{type(model).__name__} has no spec: a pipeline model is built by lite_network or build_model")
    return model.spec, model.image_size


def is_factorised(model: nn.Module) -> bool:
    """Whether any layer of `model` is a low-rank factor pair (lathe.compress.lowrank's output)."""
    return any(isinstance(m, (LowRankConv, LowRankLinear)) for m in model.modules())


def dependency_graph(model: Prunable) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, traced in eval mode (no BN statistic updates)."""
    model.eval()
    spec, size = described(model)
    example = torch.zeros(1, spec.in_channels, size, size)
    return tp.DependencyGraph().build_dependency(model, example_inputs=example)


def _groups(graph: tp.DependencyGraph, model: Prunable) -> list[tuple[ChannelGroup, tp.Group]]:
    """Every prunable group (the classifier's outputs excepted) with its torch-pruning group."""
    names = {m: n for n, m in model.named_modules()}
    out = []
    for group in graph.get_all_groups(ignored_layers=[classifier(model)], root_module_types=[nn.Conv2d, nn.Linear]):
        convs = sorted({names[dep.target.module] for dep, _ in group
                        if isinstance(dep.target.module, nn.Conv2d) and graph.is_out_channel_pruning_fn(dep.handler)})
        inputs = sorted({names[dep.target.module] for dep, _ in group if graph.is_in_channel_pruning_fn(dep.handler)
                         and isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
                         and getattr(dep.target.module, "groups", 1) == 1})
        root = names[group[0].dep.target.module]
        out.append((ChannelGroup(root, tuple(convs), len(group[0].idxs), tuple(inputs)), group))
    return out


def channel_groups(model: Prunable) -> list[ChannelGroup]:
    """The coupled channel groups of `model` (traced on a copy, so `model` is untouched), in graph order."""
    work = copy.deepcopy(model)
    return [info for info, _ in _groups(dependency_graph(work), work)]


def mac_terms(model: Prunable, groups: list[ChannelGroup]) -> list[MacTerm]:
    """Every conv and linear layer of `model` as a `MacTerm` of `groups`' counts (one forward pass, eval mode).
    Summed at the current counts they give `count_macs(model)`; at other counts, the MACs the network would
    have pruned to them (the output positions do not depend on the widths)."""
    out_key = {conv: g.convs for g in groups for conv in g.convs}
    in_key = {layer: g.convs for g in groups for layer in g.inputs}
    positions: dict[str, int] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def record(module: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            kernel = module.kernel_size[0] * module.kernel_size[1] if isinstance(module, nn.Conv2d) else 1
            positions[name] = out[0].numel() // out.shape[1] * kernel
        return record

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    spec, size = described(model)
    try:
        model.eval()(torch.zeros(1, spec.in_channels, size, size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    terms = []
    for name, m in layers.items():
        outputs, inputs = (m.out_channels, m.in_channels // m.groups) if isinstance(m, nn.Conv2d) \
            else (m.out_features, m.in_features)
        terms.append(MacTerm(out_key.get(name), outputs, in_key.get(name), inputs, positions[name]))
    return terms


def macs_for_counts(model: Prunable, groups: list[ChannelGroup], counts: dict[GroupKey, int],
                    terms: list[MacTerm] | None = None) -> int:
    """MACs per image of `model` pruned to `counts` channels per group, without pruning it: the sum of its
    `mac_terms` (pass `terms` to reuse them; they equal `spec_macs` of a ResNet's pruned spec, tested)."""
    return sum(t.macs(counts) for t in (terms if terms is not None else mac_terms(model, groups)))


def kept_channels(initial: int, removed: float, round_to: int) -> int:
    """Channels a group of `initial` keeps when a fraction `removed` of them goes: rounded to the
    nearest count, then down to a multiple of `round_to`; never fewer than one (or `round_to`)."""
    kept = math.floor(initial * (1 - removed) + 0.5)
    if round_to > 1 and initial >= round_to:
        kept = max(round_to, kept - kept % round_to)
    return max(1, min(initial, kept))


def plan_counts(initial: dict[GroupKey, int], removed: float, round_to: int) -> dict[GroupKey, int]:
    """Kept channels per group for one removed fraction (relative to the teacher's channels)."""
    return {key: kept_channels(n, removed, round_to) for key, n in initial.items()}


def check_ratio_reachable(model: Prunable, groups: list[ChannelGroup], cfg: PruneParams) -> None:
    """Refuse a ratio that would empty a layer (channels) or that no layer widths reach (MACs)."""
    if cfg.target == "channels":
        for g in groups:
            if math.floor(g.channels * (1 - cfg.ratio) + 0.5) < 1:
                raise ConfigError(
                    f"prune.ratio = {cfg.ratio} would remove every channel of layer {g.root!r} "
                    f"({g.channels} channels, keeps round({g.channels} x {1 - cfg.ratio:.3g}) = 0); "
                    f"lower prune.ratio below {1 - 0.5 / g.channels:.3f}"
                )
        return
    spec, size = described(model)
    macs = count_macs(model, size, spec.in_channels)
    floor_counts = {g.convs: kept_channels(g.channels, 1.0, cfg.round_to) for g in groups}
    floor_macs = macs_for_counts(model, groups, floor_counts)
    if floor_macs > (1 - cfg.ratio) * macs:
        raise ConfigError(
            f"prune.ratio = {cfg.ratio} (target macs) asks for at most {(1 - cfg.ratio) * macs:,.0f} MACs, but even "
            f"{min(floor_counts.values())} channel(s) per layer leave {floor_macs:,} of the teacher's {macs:,}: "
            f"any higher ratio would remove every channel of some layer; prune.ratio must stay below "
            f"{1 - floor_macs / macs:.3f}"
        )


def search_counts(model: Prunable, groups: list[ChannelGroup], initial: dict[GroupKey, int],
                  target_macs: float, round_to: int) -> dict[GroupKey, int]:
    """Kept channels per group whose MACs come closest to `target_macs`, never above the current widths.

    First a bisection over a uniform removed fraction (relative to the teacher's `initial` widths;
    MACs never grow with it) finds the last widths still above the target; then channels go one step
    (`round_to`) at a time from the group keeping the largest share of its teacher channels until
    one more step would meet the target; the last step is the single-group step (or none) whose MACs
    come closest. On small networks this lands far closer than uniform widths alone allow.
    """
    current = {g.convs: g.channels for g in groups}
    cache: dict[tuple, int] = {}
    terms = mac_terms(model, groups)

    def macs(counts: dict[GroupKey, int]) -> int:
        key = tuple(sorted(counts.items()))
        if key not in cache:
            cache[key] = macs_for_counts(model, groups, counts, terms)
        return cache[key]

    def uniform(removed: float) -> dict[GroupKey, int]:
        return {k: min(current[k], kept_channels(initial[k], removed, round_to)) for k in current}

    if macs(current) <= target_macs:
        return current
    lo, hi = 0.0, 1.0
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if macs(uniform(mid)) <= target_macs:
            hi = mid
        else:
            lo = mid
    counts = uniform(lo)
    floor = {k: kept_channels(initial[k], 1.0, round_to) for k in current}
    step = {k: round_to if initial[k] >= round_to else 1 for k in current}
    while True:
        movable = [k for k in counts if counts[k] - step[k] >= floor[k]]
        if not movable:  # cannot happen once check_ratio_reachable passed; stay at the floor
            return counts
        moves = {k: {**counts, k: counts[k] - step[k]} for k in movable}
        if any(macs(m) <= target_macs for m in moves.values()):  # the last step: the closest candidate
            return min([counts, *moves.values()], key=lambda m: (abs(macs(m) - target_macs), macs(m)))
        counts = moves[max(movable, key=lambda k: counts[k] / initial[k])]  # first in graph order on ties


def prune_to_counts(model: Prunable, counts: dict[GroupKey, int], importance: tp.importance.Importance) -> Prunable:
    """A copy of `model` with every group pruned to `counts` channels, the least important going first.

    The pruned network is rebuilt from its spec (a ResNet's read back from its layers) and its weights, so the
    result is exactly what `load_model` gives later from arch.json + weights.safetensors.
    """
    work = copy.deepcopy(model)
    graph = dependency_graph(work)
    plans = []
    for info, group in _groups(graph, work):
        keep = counts[info.convs]
        if keep >= info.channels:
            continue
        scores = importance(group)  # (channels,) float
        drop = torch.argsort(scores, stable=True)[: info.channels - keep]
        plans.append((group[0].dep.target.module, group[0].dep.handler, sorted(drop.tolist())))
    for module, handler, idxs in plans:
        graph.get_pruning_group(module, handler, idxs).prune()
    return cast(Prunable, rebuild_network(spec_after(work), described(work)[1], work.state_dict()))


def spec_after(model: Prunable) -> ArchSpec | LiteSpec:
    """The spec a (pruned) network is written with: a ResNet's read back from its layers; an EfficientNet-Lite's
    is its teacher's, since its layer widths are its weights' shapes."""
    return spec_of(model) if isinstance(model, ResNetLike) else described(model)[0]


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in scores.items()}


def prune(model: Prunable, train: dict[str, np.ndarray], val: dict[str, np.ndarray], cfg: PruneParams,
          gen: torch.Generator, task: Task, progress: Progress | None = None,
          on_round: RoundHook | None = None) -> Compressed:
    """Remove `cfg.ratio` of `model`'s MACs or channels in `cfg.steps` rounds, fine-tuning after each;
    returns the final model and a record of every round. `model`'s weights are not changed.

    Round k removes the fraction ratio * k / steps of every group's channels (target 'channels'), or
    the (nearly uniform, see `search_counts`) widths whose MACs come closest to
    (1 - ratio * k / steps) x the input model's (target 'macs'). Within a group the channels with the
    lowest `cfg.importance` go. `progress` gets each fine-tune epoch, `on_round` each pruning round.
    """
    if is_factorised(model):
        raise LatheError("prune: the input model is low-rank factorised; prune an unfactorised model")
    source_spec, size = described(model)
    in_ch = source_spec.in_channels
    importance = make_importance(cfg.importance)
    groups = channel_groups(model)
    check_ratio_reachable(model, groups, cfg)
    initial = {g.convs: g.channels for g in groups}
    teacher_macs, teacher_params = count_macs(model, size, in_ch), count_params(model)
    x_val = to_tensor(val["images"])
    teacher_val = score(predict_logits(model, x_val), val["labels"], task)

    current: Prunable = model
    rounds = []
    history: list[dict] = []
    counts = dict(initial)
    last = TrainResult(model=model)
    for k in range(1, cfg.steps + 1):
        target_macs = None
        if cfg.target == "channels":
            counts = plan_counts(initial, cfg.ratio * k / cfg.steps, cfg.round_to)
        else:
            target_macs = teacher_macs * (1 - cfg.ratio * k / cfg.steps)
            counts = search_counts(current, channel_groups(current), initial, target_macs, cfg.round_to)
        current = prune_to_counts(current, counts, importance)
        macs = count_macs(current, size, in_ch)
        row = {
            "round": k, "channels_removed": round(1 - sum(counts.values()) / sum(initial.values()), 6),
            "target_macs": None if target_macs is None else round(target_macs),
            "macs": macs, "macs_ratio": round(macs / teacher_macs, 6), "params": count_params(current),
            "channels": {g.root: counts[g.convs] for g in groups},
            "val_before_finetune": _rounded(score(predict_logits(current, x_val), val["labels"], task)),
        }
        if on_round is not None:
            on_round(row)
        offset = len(history)

        def tagged(epoch_row: dict, k: int = k, offset: int = offset) -> dict:
            return {"epoch": offset + epoch_row["epoch"], "round": k, "round_epoch": epoch_row["epoch"],
                    **{c: v for c, v in epoch_row.items() if c != "epoch"}}

        last = fit(current, train, val, cfg.finetune, gen, task,
                   progress=None if progress is None else (lambda r: progress(tagged(r))))
        history.extend(tagged(r) for r in last.history)
        row.update(best_epoch=offset + last.best_epoch, best_val=_rounded(last.best_val))
        rounds.append(row)

    spec = spec_after(current)
    result = TrainResult(model=current, history=history, best_epoch=rounds[-1]["best_epoch"], best_val=last.best_val)
    macs, params = rounds[-1]["macs"], rounds[-1]["params"]
    record = {
        "method": "structured channel pruning (torch-pruning DependencyGraph), iterative prune + fine-tune",
        "importance": cfg.importance, "target": cfg.target, "ratio": cfg.ratio, "steps": cfg.steps,
        "round_to": cfg.round_to, "image_size": size,
        "teacher": {"params": teacher_params, "macs": teacher_macs, "val": _rounded(teacher_val)},
        "pruned": {"params": params, "macs": macs, "val": _rounded(last.best_val), "spec": spec.model_dump()},
        "macs_removed": round(1 - macs / teacher_macs, 6),
        "params_removed": round(1 - params / teacher_params, 6),
        "channels_removed": round(1 - sum(counts.values()) / sum(initial.values()), 6),
        "groups": [{"root": g.root, "convs": list(g.convs), "teacher_channels": g.channels,
                    "pruned_channels": counts[g.convs]} for g in groups],
        "rounds": rounds,
        "finetune": cfg.finetune.model_dump(),
        "history": history,
        "unstructured": "not offered: masked (zeroed) weights leave a dense ONNX file as large and as slow",
    }
    return Compressed(model=current, spec=spec, image_size=size, fit=result, record=record, record_file=RECORD)


def load_source(model_dir: Path, role: str = "teacher") -> Prunable:
    """Rebuild the model to compress from its folder (a ResNet or an EfficientNet-Lite); every failure names the
    folder or file."""
    model = load_model(model_dir, role)
    if not isinstance(model, (ResNetLike, LiteNet)):  # load_model's families are these two today
        raise LatheError(f"{Path(model_dir) / FILES.arch}: not a model lathe can compress ({type(model).__name__})")
    return model


def load_data(prepared_dir: Path, model: Prunable,
              model_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Task]:
    """The train and val splits and the task, checked against the model's classes and input size."""
    task = read_task(prepared_dir)
    spec, size = described(model)
    if (task.num_classes, task.channels) != (spec.num_classes, spec.in_channels):
        raise DataError(f"{Path(prepared_dir) / TASK_FILE}: {task.num_classes} classes, {task.channels} channel(s), "
                        f"but {model_dir} was built for {spec.num_classes} and {spec.in_channels}")
    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    check_trainable(train, val, task.num_classes)
    side = int(train["images"].shape[-1])
    if side != size:
        raise DataError(f"{Path(prepared_dir) / 'train.safetensors'}: images are {side} px but {model_dir} was "
                        f"built for {size} px; rerun it on the same ingest.image_size")
    return train, val, task


def prune_teacher(teacher_dir: Path, prepared_dir: Path, cfg: PruneParams, progress: Progress | None = None,
                  on_round: RoundHook | None = None) -> Compressed:
    """Deterministically prune the teacher folder's model on the prepared train/val splits."""
    gen = make_deterministic(cfg.finetune.seed, cfg.finetune.threads)
    teacher = load_source(teacher_dir)
    train, val, task = load_data(prepared_dir, teacher, teacher_dir)
    return prune(teacher, train, val, cfg, gen, task, progress, on_round)

