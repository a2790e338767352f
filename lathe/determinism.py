"""One place to make runs repeatable, on this machine and on any other x86-64 machine with AVX2.

Two halves:

- `pin_numerics()`: the numeric platform, set in the environment *before* torch or onnxruntime is
  imported (stages/__init__.py calls it first thing). Each pin selects which kernels compute, and
  so which bits come out (measured, see README "Determinism"):

  * ATEN_CPU_CAPABILITY=avx2: ATen's vectorised kernels (reductions, softmax, elementwise, the
    optimizer's fused step) use 8-lane AVX2 code on every machine; AVX-512 code sums in another order.
  * ONEDNN_MAX_CPU_ISA=AVX2: oneDNN's convolutions (training runs channels_last through oneDNN)
    use their AVX2 kernels; AVX-512 and AMX kernels block and accumulate differently.
  * MKL_CBWR=COMPATIBLE: MKL's conditional numerical reproducibility; its AVX2 branch still takes
    another code path on AMD than on Intel, COMPATIBLE is the same on both (gemm, SVD).
  * thread counts: 2 for OpenMP/MKL pools by default; stages set torch's intra-op threads from
    params (`threads`), which is part of the result.

  `LATHE_NUMERICS=native` skips the pins (for speed experiments); the record then says so.
- `make_deterministic(seed, threads)`: seeds, deterministic algorithms, the thread count.

Vector-math (VML) ops - exp, log, tanh on large contiguous tensors, and float32 sqrt on any - go through
MKL's VML, which differs between CPUs even under CBWR; training code avoids them (lathe.model.train.soft_loss,
`exact_sqrt`) and uses the fused AdamW step (the foreach step differs between vendors).
"""

from __future__ import annotations

import os
import platform
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported only after the pins are set
    import torch

PINS: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",  # the same knob under oneDNN's older name
    "MKL_CBWR": "COMPATIBLE",
}
DEFAULT_THREADS: dict[str, str] = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
ENV_MODE = "LATHE_NUMERICS"  # "pinned" (default) or "native"
REQUIRED_CPU_FLAGS = ("avx2", "fma")  # what the pins need; without them the bytes will differ


def numerics_mode() -> str:
    return "native" if os.environ.get(ENV_MODE, "pinned").strip().lower() == "native" else "pinned"


def pin_numerics() -> dict[str, str]:
    """Set the pins in os.environ (overriding the caller's), unless LATHE_NUMERICS=native.

    Must run before torch/onnxruntime are first imported in this process; returns what was set.
    """
    if numerics_mode() == "native":
        return {}
    for name, value in DEFAULT_THREADS.items():
        os.environ.setdefault(name, value)
    os.environ.update(PINS)
    return dict(PINS)


def numerics_record() -> dict[str, Any]:
    """The pins in force: the same on every machine, so it may go into any output's identity."""
    return {"mode": numerics_mode(), "pins": dict(PINS) if numerics_mode() == "pinned" else {}}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's name with its family and model numbers, e.g. "Intel(R) Xeon(R) Processor (family 6,
    model 207)": virtual machines often show one generic name for CPUs of different generations, whose
    latencies differ by 2x, so a figure needs the numbers to say which CPU it came from."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():  # the first processor's block is enough
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine_record() -> dict[str, Any]:
    """The build machine (a measurement: never part of an output's identity)."""
    flags = cpu_flags()
    shown = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4", "f16c")))
    return {"cpu": cpu_model(), "arch": platform.machine(), "vendor_flags": shown, "cores": os.cpu_count(),
            "can_honour_pins": machine_can_honour_pins(flags)}


def machine_can_honour_pins(flags: set[str] | None = None) -> bool:
    """True on x86-64 with AVX2 and FMA: the pinned kernels exist here, so the bytes are the same."""
    flags = cpu_flags() if flags is None else flags
    return platform.machine() in ("x86_64", "AMD64") and all(f in flags for f in REQUIRED_CPU_FLAGS)


def make_deterministic(seed: int, threads: int) -> torch.Generator:
    """Seed every RNG, force deterministic kernels and `threads` intra-op threads.

    Returns a torch.Generator seeded from `seed` for explicit use (shuffles, augmentation).
    """
    import numpy as np
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def exact_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) correctly rounded, so the same bits on every CPU. float32 `torch.sqrt` is MKL's VML vsSqrt,
    which is not correctly rounded and whose last bit depends on the CPU, pins or not (measured on 100k
    values: 16% of results differ from IEEE sqrt, and differ again under qemu's EPYC-Rome and Haswell; an
    Intel Xeon and an AMD EPYC trained different QAT networks from it). In float64 it is IEEE sqrt, and
    the float64 sqrt of a float32 value rounds to the correctly rounded float32 sqrt."""
    return x.double().sqrt().to(x.dtype)
