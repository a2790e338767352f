"""File names of the INT8 stages' records: one home, read by the stages that write them and by packaging.

Light on purpose (no torch, no onnxruntime): `lathe.ship` reads these records without loading the
stages' code.
"""

from __future__ import annotations

QUANTIZE_RECORD = "quantize.json"  # post-training static INT8 (lathe.compress.quantize): calibration ids and ranges
QAT_RECORD = "qat.json"  # quantization-aware training (lathe.compress.qat): settings, formats, the check against torch
