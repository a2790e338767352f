"""Hash what every numeric path of the pipeline computes, for comparing machines and capability caps.

One short run of each: teacher-architecture training (fused AdamW, distillation loss, channels_last
through oneDNN), a pruned-shape network's training (NCHW), an SVD (lowrank), ONNX export, onnxruntime float inference, static INT8
quantization (calibration included), INT8 inference, and an epoch of quantization-aware training
(torchao's fake quantizers, BatchNorm's running std through lathe.determinism.exact_sqrt) exported to
INT8 ONNX, and an epoch of the experiments' pretrained teacher (EfficientNet-Lite0 on its ImageNet weights,
lathe.model.lite: depthwise convolutions, ReLU6, its first blocks frozen and memoized) with its ONNX export.
Prints one JSON line of sha256 prefixes
(plus the kernels in use), so two runs agree exactly when every byte agrees.

    python scripts/numerics_probe.py                      # here, with the pins (stages/__init__)
    LATHE_NUMERICS=native python scripts/numerics_probe.py # unpinned, for contrast
    qemu-x86_64 -cpu EPYC-Rome .venv/bin/python scripts/numerics_probe.py   # an AMD CPU, emulated

Used by tests/test_determinism.py (capability caps in subprocesses) and scripts/cross_isa.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Every hash the probe prints, and those that must agree on every x86-64 machine with AVX2 (ort_float may
# not: onnxruntime's float kernels differ between AVX-512 and AVX2 in the last bit; nothing that enters an
# output's bytes uses them). tests/test_determinism.py and scripts/cross_isa.py compare these.
HASHES = ("train", "train_odd", "svd", "onnx", "ort_float", "int8_model", "ort_int8", "qat_train", "qat_model",
          "lite_train", "lite_onnx")
MUST_AGREE = tuple(k for k in HASHES if k != "ort_float")
LITE_SIZE = 64  # px: Lite0 halves the size five times; at 64 its last blocks still see 2x2


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def weights_digest(model: object) -> str:
    """digest of every tensor of the model's state dict, in order (weights and BatchNorm statistics)."""
    return digest(b"".join(v.contiguous().numpy().tobytes() for v in model.state_dict().values()))  # type: ignore[attr-defined]


def probe(images: int, epochs: int, size: int) -> dict[str, object]:
    import numpy as np
    import torch

    from lathe.compress.params import QuantizeParams
    from lathe.compress.quantize import quantize_static_int8
    from lathe.config import load_section
    from lathe.data.contract import Task
    from lathe.determinism import make_deterministic, numerics_record
    from lathe.measure.ort import load_session, predict
    from lathe.model.arch import build_model
    from lathe.model.export import export_onnx
    from lathe.model.params import TrainParams
    from lathe.model.train import fit, frozen_teacher, kd_loss

    t0 = time.monotonic()
    params = ROOT / "params.yaml"
    cfg = load_section(params, "train_teacher", TrainParams)
    gen = make_deterministic(0, 2)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, size, size), dtype=np.uint8)
    y = rng.integers(0, cfg.arch.num_classes, images).astype(np.int64)
    student, teacher = build_model(cfg.arch, size), build_model(cfg.arch, size)
    loss = kd_loss(frozen_teacher(teacher), 2.0, 0.9, torch.ones(cfg.arch.num_classes), 0.05)
    fit_cfg = cfg.model_copy(update={"epochs": epochs, "batch_size": 16})
    classes = [f"class{k}" for k in range(cfg.arch.num_classes)]
    task = Task(classes=classes, defective=classes[len(classes) // 2:], image_size=size)
    result = fit(student, {"images": x, "labels": y}, {"images": x[:16], "labels": y[:16]}, fit_cfg, gen,
                 task, loss_fn=loss)
    state = result.model.state_dict()
    # a pruned network's channel counts (not multiples of 8) train in the NCHW layout (lathe.model.train.memory_layout)
    odd_arch = cfg.arch.model_copy(update={"stem_channels": 7, "widths": [7, 14, 29, 58]})
    odd = fit(build_model(odd_arch, size), {"images": x, "labels": y}, {"images": x[:16], "labels": y[:16]}, fit_cfg,
              gen, task).model
    out: dict[str, object] = {
        "aten": torch.backends.cpu.get_cpu_capability(), "numerics": numerics_record(),
        "train": weights_digest(result.model),
        "train_odd": weights_digest(odd),
    }
    weight = [v for v in state.values() if v.dim() == 4][-1]
    conv = weight.double().reshape(weight.shape[0], -1)  # as lathe.compress.lowrank.weight_matrix
    u, s, vh = torch.linalg.svd(conv, full_matrices=False)
    out["svd"] = digest(torch.cat([u.flatten(), s, vh.flatten()]).float().numpy().tobytes())
    onnx_bytes = export_onnx(result.model, size, cfg.arch.in_channels)
    out["onnx"] = digest(onnx_bytes)
    with tempfile.TemporaryDirectory(prefix="lathe-probe-") as tmp:
        model = Path(tmp) / "model.onnx"
        model.write_bytes(onnx_bytes)
        out["ort_float"] = digest(predict(load_session(model, threads=1), x).tobytes())
        qcfg = load_section(params, "quantize", QuantizeParams)
        q_bytes = quantize_static_int8(model, x, qcfg)
        out["int8_model"] = digest(q_bytes)
        q = Path(tmp) / "int8.onnx"
        q.write_bytes(q_bytes)
        out["ort_int8"] = digest(predict(load_session(q, threads=1), x).tobytes())
    out.update(probe_qat(result.model, x, y, fit_cfg, task))
    out.update(probe_lite(images, epochs, task))
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def probe_qat(model: object, x: object, y: object, fit_cfg: object, task: object) -> dict[str, str]:
    """One epoch of quantization-aware training (torchao PT2E fake quantizers; NCHW, since the prepared
    graph has no Conv2d modules) of a trained float network, converted and exported to INT8 ONNX."""
    import copy

    from lathe.compress.qat import QatNet, convert, export_qat_onnx, prepare_qat
    from lathe.determinism import make_deterministic
    from lathe.model.train import fit

    size = x.shape[-1]  # type: ignore[attr-defined]
    net = QatNet(prepare_qat(copy.deepcopy(model), size, 1))  # type: ignore[arg-type]
    trained = fit(net, {"images": x, "labels": y}, {"images": x[:16], "labels": y[:16]}, fit_cfg,  # type: ignore[arg-type]
                  make_deterministic(0, 2), task).model
    fake = weights_digest(trained)
    return {"qat_train": fake, "qat_model": digest(export_qat_onnx(convert(net), size, 1, {}))}


def probe_lite(images: int, epochs: int, task: object) -> dict[str, str]:
    """`epochs` of EfficientNet-Lite0 on its ImageNet weights (checked against the pinned sha256), the first 8
    of its 16 blocks frozen and memoized as the experiments train it (docs/teacher-experiments.md), on
    LITE_SIZE px cells; then the whole network exported to ONNX."""
    import numpy as np

    from lathe.determinism import make_deterministic
    from lathe.model.export import export_onnx
    from lathe.model.lite import IMAGENET_WEIGHTS, LiteNet
    from lathe.model.params import FitParams
    from lathe.model.pretrained import load_pretrained
    from lathe.model.train import fit, to_tensor

    state, _ = load_pretrained(IMAGENET_WEIGHTS)
    gen = make_deterministic(0, 2)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (images, LITE_SIZE, LITE_SIZE), dtype=np.uint8)
    y = rng.integers(0, task.num_classes, images).astype(np.int64)  # type: ignore[attr-defined]
    net = LiteNet(state, task.num_classes, frozen_blocks=8)  # type: ignore[attr-defined]
    net.memoize_frozen(to_tensor(x))
    cfg = FitParams(seed=0, threads=2, epochs=epochs, batch_size=16, lr=0.001)
    lite_task = task.model_copy(update={"image_size": LITE_SIZE})  # type: ignore[attr-defined]
    trained = fit(net, {"images": x, "labels": y}, {"images": x[:16], "labels": y[:16]}, cfg, gen, lite_task).model
    trained.forget_frozen()
    return {"lite_train": weights_digest(trained),
            "lite_onnx": digest(export_onnx(trained, LITE_SIZE, 1))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    import stages  # noqa: F401  pins the numeric platform before probe() imports torch (not at import: tests read HASHES)

    print(json.dumps(probe(args.images, args.epochs, args.size), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
