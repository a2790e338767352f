"""The baselines of `make bench`, what a user would do instead of the pipeline (role "baseline"):

  - onnxruntime `quantize_dynamic` of the teacher (after `quant_pre_process`),
  - onnxruntime `quantize_static` of the teacher with its defaults (QDQ, int8 activations and
    weights, MinMax, per-tensor), calibrated on the same seeded train images as the quantize stage,
  - 50% channel pruning + fine-tune alone (made by the prune stage; its folder is passed in).
The two quantized ones come from `lathe.compress.quantize_baselines`' helpers (calibration images from
`lathe.compress.calibration`), imported lazily, with plain onnxruntime calls as a fallback when those
modules are absent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lathe.errors import DataError, LatheError
from lathe.io import write_bytes
from lathe.measure.bench import BenchModel
from lathe.measure.ort import MODEL_FILE, load_proto, to_input

log = logging.getLogger(__name__)

BASELINE_DYNAMIC = "ort_dynamic_int8"
BASELINE_STATIC = "ort_static_int8_defaults"
BASELINE_PRUNED = "pruned50_finetune"


def calibration_subset(images: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The train images the pipeline's quantize stage calibrates on for (`size`, `seed`), in split order.

    Uses `lathe.compress.calibration.calibration_indices` (imported lazily) so the static baseline sees
    exactly the pipeline's calibration images; without that module, the same draw is made here.
    """
    if len(images) == 0:
        raise DataError("the train split is empty; nothing to calibrate on")
    try:
        from lathe.compress.calibration import calibration_indices
    except ImportError:
        if not 1 <= size <= len(images):
            raise LatheError(f"calibration size {size} must be between 1 and the train split's {len(images)}") from None
        return images[np.sort(np.random.default_rng(seed).choice(len(images), size=size, replace=False))]
    return images[calibration_indices(len(images), size, seed)]


# Builders return the quantized model as bytes; `workdir` holds their temp files.
DynamicBuilder = Callable[[Path, Path], bytes]  # (float model.onnx, workdir)
StaticBuilder = Callable[[Path, np.ndarray, Path], bytes]  # (float model.onnx, calibration (N, S, S) uint8, workdir)


def _input_name(onnx_path: Path) -> str:
    graph = load_proto(onnx_path).graph
    initializers = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in initializers)


def _ort_dynamic(model_path: Path, workdir: Path) -> bytes:
    """Fallback without lathe.compress.quantize_baselines: quant_pre_process, then quantize_dynamic with its
    defaults."""
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, out = Path(workdir) / "dynamic.pre.onnx", Path(workdir) / "dynamic.onnx"
    quant_pre_process(str(model_path), str(pre))
    quantize_dynamic(str(pre), str(out))
    return out.read_bytes()


def _ort_static_defaults(model_path: Path, images: np.ndarray, workdir: Path) -> bytes:
    """Fallback without lathe.compress.quantize_baselines: quantize_static(model, out, reader) with its
    defaults, one image per call."""
    from onnxruntime.quantization import quantize_static

    feeds = iter([{_input_name(model_path): to_input(images[i : i + 1])} for i in range(len(images))])
    reader = type("Reader", (), {"get_next": lambda self: next(feeds, None), "rewind": lambda self: None})()
    out = Path(workdir) / "static.onnx"
    quantize_static(str(model_path), str(out), reader)
    return out.read_bytes()


def default_builders() -> tuple[DynamicBuilder, StaticBuilder, dict[str, str]]:
    """(dynamic, static, origin text per baseline name): lathe.compress.quantize_baselines' helpers, or plain
    onnxruntime.

    Imported lazily so the bench does not depend on the quantize modules' presence. The origin texts go into
    bench.md as first written: they name the helpers' module as lathe.compress.quantize.
    """
    try:
        from lathe.compress.quantize_baselines import quantize_dynamic_int8, quantize_static_defaults
    except ImportError:
        return _ort_dynamic, _ort_static_defaults, {
            BASELINE_DYNAMIC: "quant_pre_process, then onnxruntime quantize_dynamic with all defaults",
            BASELINE_STATIC: "onnxruntime quantize_static with all defaults (QDQ, int8 activations and weights, "
                             "per-tensor, MinMax), no pre-processing",
        }
    return (
        lambda model, workdir: quantize_dynamic_int8(model, workdir=workdir),
        lambda model, images, workdir: quantize_static_defaults(model, images, workdir=workdir),
        {
            BASELINE_DYNAMIC: "lathe.compress.quantize_baselines.quantize_dynamic_int8 defaults: quant_pre_process, then onnxruntime "
                              "quantize_dynamic (per-tensor int8 weights, activations quantized at run time)",
            BASELINE_STATIC: "lathe.compress.quantize_baselines.quantize_static_defaults: onnxruntime quantize_static(model, out, reader) "
                             "with its defaults (QDQ, int8 activations and weights, per-tensor, MinMax), "
                             "no pre-processing",
        },
    )


def build_baselines(teacher_onnx: Path, work_dir: Path, calibration: np.ndarray,
                    dynamic: DynamicBuilder | None = None, static: StaticBuilder | None = None) -> list[BenchModel]:
    """Dynamic and default-static INT8 versions of the teacher, written to `work_dir/<name>/model.onnx`.

    `calibration` (N, S, S) uint8 feeds the static one. Builders default to `default_builders()`.
    """
    default_dynamic, default_static, origins = default_builders()
    if dynamic is not None or static is not None:
        origins = {k: f"{v} (custom builder)" for k, v in origins.items()}
    dynamic, static = dynamic or default_dynamic, static or default_static
    work_dir = Path(work_dir)
    models = []
    for name, build in ((BASELINE_DYNAMIC, lambda wd: dynamic(teacher_onnx, wd)),
                        (BASELINE_STATIC, lambda wd: static(teacher_onnx, calibration, wd))):
        folder = work_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        log.info("building baseline %s from %s", name, teacher_onnx)
        try:
            model_bytes = build(folder)
        except Exception as exc:  # LatheErrors too: say which baseline
            raise LatheError(f"building baseline {name} from {teacher_onnx} failed: {type(exc).__name__}: {exc}"
                             ) from exc
        write_bytes(folder / MODEL_FILE, model_bytes)
        origin = f"{teacher_onnx} -> {origins[name]}"
        if name == BASELINE_STATIC:
            origin += f"; calibrated on {len(calibration)} seeded train images (the quantize stage's)"
        models.append(BenchModel(name, "baseline", folder / MODEL_FILE, origin))
    return models


PRUNE_RECORD = "prune.json"  # what the prune stage writes beside its model


def describe_pruned_baseline(model_dir: Path) -> tuple[str, str | None]:
    """(origin text, note or None) for the "50% channel pruning + fine-tune" folder.

    Reads the prune stage's prune.json when present: a record saying anything other than
    target "channels" at ratio 0.5 yields a note (the row is still measured, under its name).
    """
    record_path = Path(model_dir) / PRUNE_RECORD
    base = f"{Path(model_dir) / MODEL_FILE}: channel pruning of the teacher + fine-tune alone (prune stage), FP32"
    if not record_path.is_file():
        return f"{base}; no {PRUNE_RECORD} beside it, so the 50% channel ratio is taken on trust", None
    try:
        record = json.loads(record_path.read_text())
        target, ratio = record["target"], float(record["ratio"])
        removed = float(record.get("channels_removed", float("nan")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return base, f"{record_path}: unreadable ({type(exc).__name__}: {exc}); cannot confirm 50% channel pruning"
    origin = f"{base}; {PRUNE_RECORD}: target {target}, ratio {ratio:g}, {100 * removed:.1f}% of channels removed"
    if target != "channels" or abs(ratio - 0.5) > 1e-9:
        return origin, (f"{BASELINE_PRUNED}: {record_path} says target={target}, ratio={ratio:g}, not 50% of "
                        "channels; make it with prune target: channels, ratio: 0.5")
    return origin, None
