"""Thin DVC stage entry points: read argv paths and one params section, call lathe, write declared outs.

Importing this package pins the numeric platform (lathe.determinism.pin_numerics) before any stage
imports torch or onnxruntime: every stage computes with the same kernels on every x86-64 machine.
"""

from lathe.determinism import pin_numerics

pin_numerics()
