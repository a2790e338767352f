"""Thin DVC stage entry points: read argv paths and one params section, call lathe, write declared outs.

Importing this package pins the numeric platform (lathe.determinism.pin_numerics) before any stage
imports torch or onnxruntime: every stage computes with the same kernels on every x86-64 machine.
It also keeps library warnings out of the stage's log unless verbose (stages.common.configure_warnings).
"""

from lathe.determinism import pin_numerics

pin_numerics()

from stages.common import configure_warnings  # noqa: E402  (after the pins: it imports lathe.config and lathe.io)

configure_warnings()
