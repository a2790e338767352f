"""CNN architectures built from a JSON-able spec (never pickled modules).

Input: (N, C, S, S) float32 in [0, 1]. Output: (N, num_classes) logits.
"""

from __future__ import annotations

import torch
from torch import nn

from lathe.config import ArchSpec


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def conv_out(size: int, stride: int, kernel: int = 3) -> int:
    """Spatial size after a conv with odd `kernel` and padding kernel // 2."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def final_feature_size(spec: ArchSpec, image_size: int) -> int:
    """Side of the last feature map, for the full-window pooling."""
    size = conv_out(image_size, spec.stem_stride, spec.stem_kernel)
    for i in range(1, len(spec.widths)):
        size = conv_out(size, 2)
    return size


class ResNetLike(nn.Module):
    """Stem, stages of basic blocks (stride 2 from the second stage), pooling, linear head."""

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
        cin = spec.stem_channels
        for i, (width, blocks) in enumerate(zip(spec.widths, spec.blocks)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if (i > 0 and b == 0) else 1))
                cin = width
        self.features = nn.Sequential(*layers)
        side = final_feature_size(spec, image_size)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(spec.widths)} stages")
        # A full-window AvgPool rather than adaptive/global pooling: the dynamo exporter turns the
        # latter into ReduceMean, on which onnxruntime's quantization shape inference crashes.
        self.pool = nn.AvgPool2d(side)
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(cin, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.head(self.dropout(x))


def build_model(spec: ArchSpec, image_size: int) -> ResNetLike:
    """Build the network described by `spec` for square inputs of `image_size` pixels."""
    return ResNetLike(spec, image_size)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
