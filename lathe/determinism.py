"""One place to make torch runs repeatable: seeds, deterministic kernels, a fixed thread count."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def make_deterministic(seed: int, threads: int) -> torch.Generator:
    """Seed every RNG, force deterministic kernels and `threads` intra-op threads.

    Returns a torch.Generator seeded from `seed` for explicit use (shuffles, augmentation).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
