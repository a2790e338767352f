"""The package stage's params: the variants it may ship, the signing key, and one profile per target."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from lathe.config import Section, parse_section
from lathe.errors import ConfigError
from lathe.ship.signing import DEFAULT_PRIVATE_KEY

ALL_VARIANTS = ["teacher", "pruned", "student", "student_control", "lowrank",
                "quantized/teacher", "quantized/pruned", "quantized/student", "quantized/student_control",
                "quantized/lowrank", "qat/student"]


TARGET_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # a folder name and a dvc.yaml foreach key


# How a target picks among the variants passing all its gates (ranking and tie-breaks: lathe.ship.gates.RANKS)
SelectionPolicy = Literal["smallest", "fastest", "most_accurate"]


class GateParams(Section):
    """A target's acceptance gates in plant terms; a gate left null is not checked (but reported)."""

    max_size_bytes: int | None = Field(None, ge=1, description="whole model on disk, bytes")
    max_latency_p50_ms: float | None = Field(None, gt=0, description="batch-1 p50 as the evaluate stage measured it here; "
                                              "judged and reported, it does not decide the choice")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="4-class argmax accuracy on the test split")
    min_defective_recall: float | None = Field(
        None, ge=0, le=1, description="test-split defective recall at the package's threshold (1 - escape rate)")
    max_false_reject_rate: float | None = Field(
        None, ge=0, le=1, description="test-split fraction of functional cells judged defective at the threshold")


class TargetParams(Section):
    """One device profile (an entry of params.yaml `targets`, keyed by the target's name)."""

    description: str = ""
    runtime: Literal["onnxruntime-cpu"] = "onnxruntime-cpu"
    threads: int = Field(1, ge=1, description="intra-op threads the device runs the model with")
    batch: int = Field(1, ge=1, description="images per call on the device")
    defective_recall_target: float = Field(
        0.85, gt=0, le=1, description="the decision threshold is the highest one reaching this recall on the val split")
    gates: GateParams = GateParams()
    selection: SelectionPolicy = Field(
        "smallest", description="among the variants passing every gate: smallest (bytes), fastest (p50 measured by "
                                "the evaluate stage on the build machine) or most_accurate (test accuracy)")


class PackageParams(Section):
    """The package stage: candidates, signing key and the dirty-tree policy (shared by every target)."""

    variants: list[str] = Field(default_factory=lambda: list(ALL_VARIANTS), min_length=1,
                                description="evaluated variants (models/<v>, reports/<v>) the stage may choose from")
    private_key: str = Field(str(DEFAULT_PRIVATE_KEY),
                             description="EC private key (PEM) for model signing; env LATHE_SIGNING_KEY overrides")
    allow_dirty: bool = Field(False, description="package a git tree with uncommitted changes (recorded); "
                                                 "env LATHE_ALLOW_DIRTY=1 does the same")
    selftest_per_class: int = Field(2, ge=1, le=64, description="golden test-split images per class in selftest.npz")

    @model_validator(mode="after")
    def _safe_variants(self) -> PackageParams:
        for v in self.variants:
            parts = v.split("/")
            if v.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"variant {v!r} must be a relative path below models/ (e.g. quantized/student)")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants are listed twice: {self.variants}")
        return self


def parse_targets(params: dict, source: str = "params.yaml") -> dict[str, TargetParams]:
    """params['targets'] (a mapping name -> profile) validated; errors name `targets.<name>.<key>`."""

    raw = params.get("targets")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: section 'targets' must be a non-empty mapping of target name -> profile")
    out: dict[str, TargetParams] = {}
    for name, profile in raw.items():
        if not isinstance(name, str) or not re.match(TARGET_NAME, name):
            raise ConfigError(f"{source}: target name {name!r} must match {TARGET_NAME} (it names a folder)")
        out[name] = parse_section({f"targets.{name}": profile}, f"targets.{name}", TargetParams, source)
    return out
