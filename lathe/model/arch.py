"""CNN architectures built from a JSON-able spec (never pickled modules).

Input: (N, C, S, S) float32 in [0, 1]. Output: (N, num_classes) logits. A spec may also describe a
compressed network (pruned widths, shortcut types, low-rank layers); `build_model` rebuilds it.
"""

from __future__ import annotations

import torch
from torch import nn

from lathe.model.params import ArchSpec


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual shortcut (1x1 conv-BN when the shape changes).

    `mid` is conv1's output width (default `cout`); `projection` forces the shortcut type (default:
    a projection exactly when the stride or the width changes). Pruning keeps a projection even if
    it leaves cin == cout, because its trained weights are part of the function.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))

    def __init__(self, cin: int, cout: int, stride: int, mid: int | None = None, projection: bool | None = None) -> None:
        super().__init__()
        mid = cout if mid is None else mid
        if projection is None:
            projection = stride != 1 or cin != cout
        if not projection and (stride != 1 or cin != cout):
            raise ValueError(f"an identity shortcut cannot map {cin} -> {cout} channels at stride {stride}")
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if projection:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def conv_out(size: int, stride: int, kernel: int = 3) -> int:
    """Spatial size after a conv with odd `kernel` and padding kernel // 2."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def final_feature_size(spec: ArchSpec, image_size: int) -> int:
    """Side of the last feature map, for the full-window pooling."""
    size = conv_out(image_size, spec.stem_stride, spec.stem_kernel)
    for _ in spec.widths[1:]:  # every later stage halves the side once
        size = conv_out(size, 2)
    return size


class ResNetLike(nn.Module):
    """Stem, stages of basic blocks (stride 2 from the second stage), pooling, linear head.

    Optional spec fields: `mid_channels` (conv1 width per block) and `projection` (shortcut type
    per block), written by pruning; `ranks`, written by the low-rank pass, replaces the named
    conv/linear layers by rank-r factor pairs after the plain network is built.

    Shapes for (N, C, S, S) input: the stem gives (N, stem_channels, S/stem_stride, ..), every later
    stage halves the side, the full-window pool gives (N, widths[-1]) and the head the logits.
    Module names (stem.0, features.<block>.conv1 / conv2 / shortcut.0, head) are the keys of
    weights.safetensors and of `ranks`: renaming them breaks every saved model, so they are fixed
    (the default spec builds exactly the layers, init order and names of the original teacher).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.head(self.dropout(x))

    def __init__(self, spec: ArchSpec, image_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.image_size = image_size
        self.stem = nn.Sequential(
            nn.Conv2d(spec.in_channels, spec.stem_channels, spec.stem_kernel, spec.stem_stride,
                      spec.stem_kernel // 2, bias=False),
            nn.BatchNorm2d(spec.stem_channels),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        for j, (cin, cout, stride) in enumerate(spec.block_shapes()):
            mid = spec.mid_channels[j] if spec.mid_channels is not None else None
            projection = spec.projection[j] if spec.projection is not None else None
            layers.append(BasicBlock(cin, cout, stride, mid, projection))
        self.features = nn.Sequential(*layers)
        side = final_feature_size(spec, image_size)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(spec.widths)} stages")
        # A full-window pool rather than adaptive/global pooling: the dynamo exporter turns the
        # latter into ReduceMean/ReduceMax, on which onnxruntime's quantization shape inference crashes.
        self.pool = nn.MaxPool2d(side) if spec.pool == "max" else nn.AvgPool2d(side)
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(spec.widths[-1], spec.num_classes)
        if spec.ranks:
            apply_ranks(self, spec.ranks)


class LowRankConv(nn.Sequential):
    """A rank-r factor of a KxK conv (Cout, Cin, K, K): KxK conv Cin -> r (same stride and padding),
    then 1x1 conv r -> Cout carrying the original bias, if any."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, rank: int, bias: bool) -> None:
        super().__init__(
            nn.Conv2d(cin, rank, kernel, stride, padding, bias=False),
            nn.Conv2d(rank, cout, 1, bias=bias),
        )


class LowRankLinear(nn.Sequential):
    """A rank-r factor of a Linear (out, in): Linear in -> r, then Linear r -> out with the bias."""

    def __init__(self, cin: int, cout: int, rank: int, bias: bool) -> None:
        super().__init__(nn.Linear(cin, rank, bias=False), nn.Linear(rank, cout, bias=bias))


def factor_shape(layer: nn.Module) -> tuple[int, int]:
    """(rows, cols) of the matrix a conv/linear layer's weight unfolds to: (Cout, Cin*K*K) or (out, in)."""
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels, layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    raise TypeError(f"{type(layer).__name__} is not a Conv2d or Linear")


def low_rank_module(layer: nn.Module, rank: int) -> nn.Module:
    """An (untrained) rank-`rank` replacement for a Conv2d (groups 1) or Linear `layer`."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.dilation != (1, 1) or not isinstance(layer.padding, tuple):
            raise ValueError("only plain convs (groups 1, dilation 1, numeric padding) can be factorised")
        return LowRankConv(layer.in_channels, layer.out_channels, layer.kernel_size[0], layer.stride[0],
                           layer.padding[0], rank, layer.bias is not None)
    return LowRankLinear(layer.in_features, layer.out_features, rank, layer.bias is not None)


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace the named conv/linear layers of `model` by rank-r factor pairs (in place, sorted by name)."""
    for name in sorted(ranks):
        rank = ranks[name]
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            known = ", ".join(n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
            raise ValueError(f"ranks: no conv/linear layer named {name!r}; layers are: {known}")
        rows, cols = factor_shape(layer)
        if not 1 <= rank <= min(rows, cols):
            raise ValueError(f"ranks[{name!r}] = {rank} is outside 1..{min(rows, cols)} for a {rows}x{cols} weight")
        model.set_submodule(name, low_rank_module(layer, rank))


def build_model(spec: ArchSpec, image_size: int) -> ResNetLike:
    """Build the network described by `spec` for square inputs of `image_size` pixels."""
    return ResNetLike(spec, image_size)


def spec_of(model: ResNetLike) -> ArchSpec:
    """The spec of a (possibly pruned in place) network, read back from its layer shapes. Block output widths
    must agree within a stage (residual adds couple them). A candidate pruning is priced without a spec
    (`lathe.compress.prune.macs_for_counts`)."""
    if model.spec.ranks:
        raise ValueError("spec_of cannot read a low-rank factorised network")
    outs = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    blocks = list(model.features)
    widths, mids, projection, j = [], [], [], 0
    for stage, count in enumerate(model.spec.blocks):
        stage_out = {outs[f"features.{j + b}.conv2"] for b in range(count)}
        if len(stage_out) != 1:
            raise ValueError(f"stage {stage} blocks disagree on their output width: {sorted(stage_out)}")
        widths.append(stage_out.pop())
        for b in range(count):
            mids.append(outs[f"features.{j + b}.conv1"])
            projection.append(not isinstance(blocks[j + b].shortcut, nn.Identity))
        j += count
    return model.spec.model_copy(update={
        "stem_channels": outs["stem.0"], "widths": widths, "mid_channels": mids, "projection": projection,
    })


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int, in_channels: int = 1) -> int:
    """Multiply-accumulates for one (1, C, S, S) image: convs out_elems * Cin/groups * kH * kW,
    linears out * in; pooling, adds and activations are not counted (as lathe.measure.ort counts ONNX).

    Runs one forward pass in eval mode on the model's device (works on the meta device) and
    restores the training flag.
    """
    total = 0

    def hook(module: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += out[0].numel() * per_out
        else:
            total += out[0].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        device = next(model.parameters()).device
        model.eval()(torch.zeros(1, in_channels, image_size, image_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)


def spec_macs(spec: ArchSpec, image_size: int) -> int:
    """MACs per image of the network `spec` describes, without allocating its weights (meta device)."""
    with torch.device("meta"):
        model = build_model(spec, image_size)
    return count_macs(model, image_size, spec.in_channels)
