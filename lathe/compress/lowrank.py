"""Low-rank factorisation of conv and linear layers by truncated SVD, then fine-tuning.

A KxK conv with weight W (Cout, Cin, K, K) unfolds to a (Cout, Cin*K*K) matrix U S V^T. Keeping
the top r singular values gives a KxK conv Cin -> r (weights sqrt(S_r) V_r^T, same stride and
padding) followed by a 1x1 conv r -> Cout (weights U_r sqrt(S_r), the original bias); a Linear
becomes two Linears the same way. r is the smallest rank holding `energy` of the squared singular
values, and a layer is factorised only if that saves parameters: r (Cin K K + Cout) < Cout Cin K K.

A factorised ResNet is an `ArchSpec` with `ranks` (layer name -> rank), which `build_model` rebuilds by code;
a factorised EfficientNet-Lite keeps its `LiteSpec`, its factor pairs being in its weights
(`lathe.model.lite.factor_ranks`). Either loads with `lathe.model.teacher.load_model` like any other model
folder. Depthwise convs (an MBConv's) are left whole: one KxK filter per channel has nothing to factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from lathe.compress.params import LowRankParams
from lathe.compress.prune import Prunable, described, is_factorised, load_data, load_source
from lathe.compress.result import Compressed
from lathe.data.contract import Task
from lathe.determinism import make_deterministic
from lathe.errors import LatheError
from lathe.model.arch import ResNetLike, count_macs, count_params, factor_shape
from lathe.model.teacher import rebuild_network
from lathe.model.train import Progress, fit, predict_logits, score, to_tensor

RECORD = "lowrank.json"  # what factorisation did, beside FILES.summary


def choose_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values hold at least `energy` of the sum of squares."""
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(power, 0) / total
    # A relative 1e-12 slack so energy = 1.0 gives the full rank despite rounding in the cumsum.
    return min(int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1, len(power))


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """A conv's (Cout, Cin, K, K) or a linear's (out, in) weight as a float64 (rows, cols) matrix."""
    return layer.weight.detach().double().reshape(layer.weight.shape[0], -1)


def factor_weights(layer: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """State-dict entries ("0.weight", "1.weight", "1.bias") of the rank-`rank` factor pair of `layer`."""
    u, s, vh = torch.linalg.svd(weight_matrix(layer), full_matrices=False)
    root = s[:rank].sqrt()
    first = (root[:, None] * vh[:rank]).float()  # (r, Cin*K*K)
    second = (u[:, :rank] * root[None, :]).float()  # (Cout, r)
    if isinstance(layer, nn.Conv2d):
        first = first.reshape(rank, *layer.weight.shape[1:])  # (r, Cin, K, K)
        second = second.reshape(layer.out_channels, rank, 1, 1)
    out = {"0.weight": first.contiguous(), "1.weight": second.contiguous()}
    if layer.bias is not None:
        out["1.bias"] = layer.bias.detach().clone()
    return out


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one conv/linear layer."""

    name: str
    shape: tuple[int, int]  # (rows, cols) of the unfolded weight
    full_rank: int
    rank: int  # the energy rank (also recorded for layers left whole)
    energy_kept: float  # fraction of squared singular values in the top `rank`
    params_before: int  # weight entries of the layer
    params_after: int  # weight entries of the factor pair (= params_before when left whole)
    factorised: bool
    reason: str  # why it was left whole, or "" when factorised


def plan_layer(name: str, layer: nn.Module, cfg: LowRankParams) -> LayerPlan:
    """Rank by the energy rule; factorise only wide enough layers where it saves parameters."""
    rows, cols = factor_shape(layer)
    s = torch.linalg.svdvals(weight_matrix(layer))
    rank = choose_rank(s, cfg.energy)
    energy_kept = float((s[:rank] ** 2).sum() / (s ** 2).sum()) if float((s ** 2).sum()) > 0 else 1.0
    before, after = rows * cols, rank * (rows + cols)
    reason = ""
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        reason = f"grouped conv ({layer.groups} groups): one filter per group of channels, nothing to factor"
    elif rows < cfg.min_channels:
        reason = f"{rows} output channels < lowrank.min_channels {cfg.min_channels}"
    elif after >= before:
        reason = f"rank {rank} saves nothing ({after} >= {before} weights)"
    return LayerPlan(name, (rows, cols), min(rows, cols), rank, round(energy_kept, 6), before,
                     before if reason else after, not reason, reason)


def plan_ranks(model: nn.Module, cfg: LowRankParams) -> list[LayerPlan]:
    """A plan for every Conv2d and Linear of `model`, in module order."""
    return [plan_layer(name, m, cfg) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def factorize(model: Prunable, ranks: dict[str, int]) -> Prunable:
    """A new network whose named layers are rank-r factor pairs from the truncated SVD of `model`'s
    weights; every other tensor is copied. At full rank the outputs equal the original's (float32)."""
    if is_factorised(model):
        raise LatheError("lowrank: the input model is already factorised (some of its layers are factor pairs)")
    state = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in ranks}
    for name in ranks:
        for key, value in factor_weights(model.get_submodule(name), ranks[name]).items():
            state[f"{name}.{key}"] = value
    # A ResNet's spec names its factorised layers; a LiteNet reads them from the weights' keys
    spec, size = described(model)
    if isinstance(model, ResNetLike):
        spec = model.spec.model_copy(update={"ranks": dict(sorted(ranks.items()))})
    return cast(Prunable, rebuild_network(spec, size, state))


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in scores.items()}


def lowrank(model: Prunable, train: dict[str, np.ndarray], val: dict[str, np.ndarray], cfg: LowRankParams,
            gen: torch.Generator, task: Task, progress: Progress | None = None) -> Compressed:
    """Factorise `model` (left untouched) by the energy rule, then fine-tune; returns the model and a record."""
    spec, size = described(model)
    in_ch = spec.in_channels
    plans = plan_ranks(model, cfg)
    ranks = {p.name: p.rank for p in plans if p.factorised}
    if not ranks:
        raise LatheError(
            f"lowrank: no layer can be factorised with energy {cfg.energy} and min_channels {cfg.min_channels} "
            "(no rank saves parameters); lower lowrank.energy or lowrank.min_channels"
        )
    x_val = to_tensor(val["images"])
    teacher_val = score(predict_logits(model, x_val), val["labels"], task)
    factored = factorize(model, ranks)
    before_ft = score(predict_logits(factored, x_val), val["labels"], task)
    result = fit(factored, train, val, cfg.finetune, gen, task, progress=progress)
    teacher_macs, teacher_params = count_macs(model, size, in_ch), count_params(model)
    macs, params = count_macs(factored, size, in_ch), count_params(factored)
    record = {
        "method": "truncated SVD of conv/linear weights (KxK Cin->r then 1x1 r->Cout), then fine-tune",
        "energy": cfg.energy, "min_channels": cfg.min_channels, "image_size": size,
        "teacher": {"params": teacher_params, "macs": teacher_macs, "val": _rounded(teacher_val)},
        "lowrank": {"params": params, "macs": macs, "val": _rounded(result.best_val),
                    "val_before_finetune": _rounded(before_ft)},
        "params_removed": round(1 - params / teacher_params, 6),
        "macs_removed": round(1 - macs / teacher_macs, 6),
        "ranks": dict(sorted(ranks.items())),
        "layers": [{"name": p.name, "shape": list(p.shape), "full_rank": p.full_rank, "rank": p.rank,
                    "energy_kept": p.energy_kept, "params_before": p.params_before, "params_after": p.params_after,
                    "factorised": p.factorised, "reason": p.reason} for p in plans],
        "finetune": cfg.finetune.model_dump(),
        "history": result.history,
    }
    return Compressed(model=factored, spec=described(factored)[0], image_size=size, fit=result, record=record, record_file=RECORD)


def lowrank_teacher(teacher_dir: Path, prepared_dir: Path, cfg: LowRankParams,
                    progress: Progress | None = None) -> Compressed:
    """Deterministically factorise and fine-tune the teacher folder's model on the prepared splits."""
    gen = make_deterministic(cfg.finetune.seed, cfg.finetune.threads)
    teacher = load_source(teacher_dir)
    train, val, task = load_data(prepared_dir, teacher, teacher_dir)
    return lowrank(teacher, train, val, cfg, gen, task, progress)

