"""Tiny, fast settings and workspaces shared by tests (real tools, small data)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from lathe.offline import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Params small enough for a 2-core machine: 16 px images, a two-stage CNN, one or two epochs per step
# after the teacher. The teacher gets enough optimizer steps (10 epochs of batch 8) to learn the generated
# classes well above chance (tests/integration/test_pipeline.py says by how much); ~2 s here.
TINY_PARAMS = {
    "data": {"classes": ["functional", "possibly_defective", "probably_defective", "defective"],
             "defective": ["probably_defective", "defective"], "stratify": ["label", "cell_type"]},
    "ingest": {"image_size": 16, "seed": 0, "val_fraction": 0.2, "test_fraction": 0.25},
    "validate": {"min_rows": 20, "min_per_class_per_split": 1},
    "train_teacher": {
        "seed": 0, "threads": 1, "epochs": 10, "batch_size": 8, "lr": 0.01,
        "arch": {"stem_channels": 8, "stem_stride": 1, "widths": [8, 16], "blocks": [1, 1]},
    },
    "evaluate": {"latency_warmup": 1, "latency_runs": 5, "throughput_batch": 8, "throughput_runs": 1},
    "prune": {"ratio": 0.5, "steps": 2, "finetune": {"seed": 0, "threads": 1, "epochs": 1, "batch_size": 16, "lr": 0.001}},
    "prune_baseline": {"target": "channels", "ratio": 0.5, "steps": 1,
                       "finetune": {"seed": 0, "threads": 1, "epochs": 1, "batch_size": 16, "lr": 0.001}},
    # every key the distill_control stage lists in dvc.yaml must be present
    "distill": {"seed": 0, "threads": 1, "epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.003,
                "weight_decay": 0.0005, "label_smoothing": 0.05, "class_weighting": "sqrt_inverse", "ema_decay": 0.0,
                "sam_rho": 0.0, "mixup": 0.0,
                "select_on": "score",
                "augment": {"hflip": True, "vflip": True}, "init": "scratch",
                "student": {"stem_channels": 4, "stem_stride": 1, "widths": [4, 8], "blocks": [1, 1]}},
    "lowrank": {"energy": 0.8, "min_channels": 4, "finetune": {"seed": 0, "threads": 1, "epochs": 1, "batch_size": 16, "lr": 0.001}},
    "quantize": {"seed": 0, "calibration_size": 8},
    "qat": {"seed": 0, "threads": 1, "epochs": 1, "batch_size": 16, "lr": 0.001},
    "compare": {"pareto_metric": "accuracy"},
    "bench": {},  # `make bench` (not a stage) reads it; every section a reader asks for must exist
    "targets": {"tiny-gw": {"defective_recall_target": 0.5,
                            "gates": {"max_size_bytes": 10_000_000, "min_accuracy": 0.0}}},
    "package": {"private_key": ".lathe/keys/signing-key.pem"},
}

PROJECT_FILES = ["lathe", "stages", "flows", "dvc.yaml"]


def tiny_params(**overrides: dict) -> dict:
    """TINY_PARAMS with per-section overrides merged in."""
    params = copy.deepcopy(TINY_PARAMS)
    for name, values in overrides.items():
        params.setdefault(name, {}).update(values)
    return params


def make_prepared(root: Path, params: dict | None = None) -> Path:
    """Generated raw data at root/raw, ingested to root/prepared (returned).

    `params` is the ingest section, TINY_PARAMS["ingest"] when None.
    """
    from lathe.data.contract import DataParams
    from lathe.data.ingest import ingest, write_prepared
    from lathe.data.params import IngestParams
    from lathe.data.raw import generate_raw

    generate_raw(root / "raw", per_class_type=6, size=32)
    cfg = IngestParams(**(TINY_PARAMS["ingest"] if params is None else params))
    rows, images, task = ingest(root / "raw", cfg, DataParams(**TINY_PARAMS["data"]))
    write_prepared(root / "prepared", rows, images, task)
    return root / "prepared"


def write_tiny_task(prepared: Path, image_size: int, channels: int = 1) -> Path:
    """task.json for a hand-made prepared folder: TINY_PARAMS["data"] (the 4 ELPV-shaped classes)."""
    from lathe.data.contract import DataParams, task_of, write_task

    data = DataParams(**{**TINY_PARAMS["data"], "channels": channels})
    prepared.mkdir(parents=True, exist_ok=True)
    write_task(prepared, task_of(data, image_size, ["defect_probability", "cell_type"]))
    return prepared


def make_teacher(root: Path, prepared: Path, epochs: int = 1) -> Path:
    """A tiny teacher trained on `prepared` with TINY_PARAMS["train_teacher"] for `epochs`, written as a
    full model folder (weights, arch, ONNX checked on the val images, summary) at root/teacher (returned)."""
    from lathe.data.ingest import load_split
    from lathe.model.params import TrainParams
    from lathe.model.teacher import train_teacher, write_model_dir

    cfg = TrainParams(**{**TINY_PARAMS["train_teacher"], "epochs": epochs})
    model, result, size = train_teacher(prepared, cfg)
    write_model_dir(root / "teacher", model, model.spec, size, result, load_split(prepared, "val")["images"])
    return root / "teacher"


def offline_env() -> dict[str, str]:
    """The environment the Makefile sets: venv first on PATH, telemetry off."""
    env = dict(os.environ)
    env.update({**OFFLINE_ENV, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    return env


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in `cwd` with the offline env; output captured as text."""
    res = subprocess.run(cmd, cwd=cwd, env=offline_env(), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def make_workspace(dest: Path, params: dict, raw_per_class_type: int = 12,
                   make_raw: Callable[[Path], object] | None = None) -> Path:
    """A real git + DVC repo holding the project code, tiny params and raw data, committed. The raw data
    is generated (ELPV-shaped, `raw_per_class_type` per class and cell type), or `make_raw(data/raw)`'s."""
    from lathe.data.raw import generate_raw

    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy2(ROOT / ".gitignore", dest / ".gitignore")
    if make_raw is None:
        generate_raw(dest / "data" / "raw", per_class_type=raw_per_class_type, size=32, seed=0)
    else:
        make_raw(dest / "data" / "raw")
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "config", "user.email", "test@lathe.invalid")
    sh(dest, "git", "config", "user.name", "lathe tests")
    sh(dest, "dvc", "init", "-q")
    sh(dest, "dvc", "config", "core.analytics", "false")
    sh(dest, "dvc", "add", "-q", "data/raw")
    sh(dest, "lathe", "keys", "init")  # the package stage signs; .lathe/ is git-ignored
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-q", "-m", "tiny workspace")
    return dest


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM, as systemd or `docker stop` would send; SIGKILL if it has not exited in `timeout` s."""
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
