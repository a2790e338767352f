"""The pinned numeric platform (lathe.determinism): one training, an SVD, one quantization and one QAT epoch give
the same bytes whatever kernels the machine would otherwise pick; without the pins they do not.

Each probe (scripts/numerics_probe.py) runs in its own process, because the kernel choices are made
when torch and onnxruntime load. Machines are emulated by capability caps; the cross-vendor runs
(AMD EPYC and Intel Haswell under qemu) are in scripts/cross_isa.py and README "Determinism".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lathe.determinism import PINS, cpu_flags, cpu_model
from scripts.numerics_probe import HASHES

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "scripts" / "numerics_probe.py"


def probe(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in PINS and k not in ("LATHE_NUMERICS", "MKL_ENABLE_INSTRUCTIONS")}
    full.update(env)
    res = subprocess.run([sys.executable, str(PROBE)], env=full, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def hashes(result: dict) -> dict:
    return {k: result[k] for k in HASHES}


@pytest.fixture(scope="module")
def pinned() -> dict:
    return probe()


def test_pins_are_in_force_and_recorded(pinned):
    assert pinned["aten"] == "AVX2"
    assert pinned["numerics"] == {"mode": "pinned", "pins": PINS}


@pytest.mark.parametrize("caps", [
    {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},  # MKL as on a machine without AVX-512
    {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    # a user's own kernel choices do not leak through: the pins override them
    {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX", "MKL_CBWR": "AUTO"},
], ids=["mkl-avx2", "mkl-sse42", "user-overrides"])
def test_training_svd_and_quantization_give_the_same_bytes_under_other_capability_caps(pinned, caps):
    assert hashes(probe(**caps)) == hashes(pinned)


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="the contrast needs a CPU with AVX-512")
def test_without_the_pins_the_kernel_choice_changes_the_trained_bytes():
    """The control: unpinned, ATen's AVX-512 and AVX2 kernels train different weights (so the test
    above could fail, and the pins are what makes it pass)."""
    wide = probe(LATHE_NUMERICS="native", ATEN_CPU_CAPABILITY="avx512")
    narrow = probe(LATHE_NUMERICS="native", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert (wide["aten"], narrow["aten"]) == ("AVX512", "AVX2")
    assert wide["train"] != narrow["train"]


def test_the_cpu_is_named_with_its_family_and_model_numbers():
    """Two generations behind one generic name ("Intel(R) Xeon(R) Processor") time differently, so a
    figure's machine carries the numbers; only the first processor's block is read."""
    two_cpus = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\n"
                "model name\t: Intel(R) Xeon(R) Processor\n\nprocessor\t: 1\nmodel\t\t: 143\n")
    assert cpu_model(two_cpus) == "Intel(R) Xeon(R) Processor (family 6, model 207)"
    assert cpu_model("model name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    assert cpu_model("") != ""
