"""Typed, validated params: one pydantic model per params.yaml section.

Every model forbids extra keys so a typo fails at once with the key's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lathe.errors import ConfigError


class Section(BaseModel):
    """Base for params sections: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestParams(Section):
    image_size: int = Field(64, ge=8, le=1024, description="square side in pixels after resize")
    seed: int = 0
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.25, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _train_split_left(self) -> "IngestParams":
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:.2f} "
                "leaves less than 20% for training; lower one of them"
            )
        return self


class ValidateParams(Section):
    """The data gate's thresholds; every one becomes a Great Expectations expectation."""

    min_rows: int = Field(20, ge=1)
    max_rows: int = Field(1_000_000, ge=1)
    min_per_class_per_split: int = Field(1, ge=0, description="samples of each class in each split")
    class_values: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1)
    defect_probabilities: list[float] = Field(
        default_factory=lambda: [0.0, 1 / 3, 2 / 3, 1.0], min_length=1,
        description="allowed values; compared after rounding both sides to 6 decimals",
    )
    cell_types: list[str] = Field(default_factory=lambda: ["mono", "poly"], min_length=1)
    pixel_mean_min: float = Field(5.0, description="per-image mean of the 8-bit source pixels")
    pixel_mean_max: float = 250.0
    pixel_std_min: float = Field(1.0, ge=0, description="below this an image is (nearly) blank")
    source_min_side: int = Field(32, ge=1, description="smallest accepted source image side in px")

    @model_validator(mode="after")
    def _bounds(self) -> "ValidateParams":
        if self.min_rows > self.max_rows:
            raise ValueError(f"min_rows ({self.min_rows}) is larger than max_rows ({self.max_rows})")
        if self.pixel_mean_min > self.pixel_mean_max:
            raise ValueError(
                f"pixel_mean_min ({self.pixel_mean_min}) is larger than pixel_mean_max ({self.pixel_mean_max})"
            )
        return self


class ArchSpec(Section):
    """A small ResNet-style CNN: stem conv, stages of basic blocks, global pooling, linear head."""

    in_channels: int = Field(1, ge=1)
    num_classes: int = Field(4, ge=2)
    stem_channels: int = Field(32, ge=1)
    stem_stride: int = Field(2, ge=1, le=4)
    stem_kernel: int = Field(3, ge=1, le=9, description="odd; >= stem_stride so no pixel is skipped")
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128, 256])
    blocks: list[int] = Field(default_factory=lambda: [1, 1, 1, 1])
    dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _stages_match(self) -> "ArchSpec":
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(
                f"widths ({len(self.widths)} entries) and blocks ({len(self.blocks)} entries) "
                "must be non-empty and of equal length: one entry per stage"
            )
        if self.stem_kernel % 2 == 0 or self.stem_kernel < self.stem_stride:
            raise ValueError(
                f"stem_kernel {self.stem_kernel} must be odd and >= stem_stride {self.stem_stride}"
            )
        if any(w < 1 for w in self.widths) or any(b < 1 for b in self.blocks):
            raise ValueError("every stage needs width >= 1 and blocks >= 1")
        return self


class AugmentParams(Section):
    hflip: bool = True
    vflip: bool = True
    rot180: bool = True
    rot90: bool = Field(False, description="quarter turns; turns busbars, so off unless cells vary in orientation")
    brightness: float = Field(0.1, ge=0, le=1, description="max relative gain change")
    contrast: float = Field(0.1, ge=0, le=1)
    max_shift_px: int = Field(2, ge=0)


class TrainParams(Section):
    seed: int = 0
    threads: int = Field(2, ge=1)
    arch: ArchSpec = ArchSpec()
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, description="peak of the one-cycle schedule")
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    class_weighting: Literal["none", "sqrt_inverse", "inverse"] = "sqrt_inverse"
    ema_decay: float = Field(0.0, ge=0, lt=1, description="0 disables the weight EMA")
    augment: AugmentParams = AugmentParams()


class EvaluateParams(Section):
    """How every model variant is judged through onnxruntime (quality on the test split, speed)."""

    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads (inter-op is 1, sequential)")
    latency_warmup: int = Field(20, ge=0, description="untimed batch-1 calls before timing")
    latency_runs: int = Field(300, ge=1, description="timed batch-1 calls; p50/p95 are taken over these")
    throughput_batch: int = Field(64, ge=1, le=4096, description="images per call for throughput (export allows <= 4096)")
    throughput_runs: int = Field(5, ge=1, description="timed calls at throughput_batch; the median is reported")
    defective_from_class: int = Field(2, ge=1, description="class >= this counts as defective")


S = TypeVar("S", bound=Section)


def load_params(path: Path) -> dict:
    """Read params.yaml; the message names the file on a YAML error."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: params file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def parse_section(params: dict, name: str, model: type[S], source: str = "params.yaml") -> S:
    """Validate `params[name]` against `model`; errors name the section, key and expectation."""
    raw = params.get(name)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in (name, *err["loc"]))
            got = f" (got {err['input']!r})" if err["type"] != "missing" and "input" in err else ""
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(_field_names(model, err["loc"][:-1])))
                msg = f"unknown key; allowed keys here: {allowed}"
                got = ""
            lines.append(f"  {key}: {msg}{got}")
        raise ConfigError(f"{source}: invalid section '{name}':\n" + "\n".join(lines)) from None


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """The allowed keys of the (possibly nested) model at `loc`."""
    current: type[BaseModel] = model
    for part in loc:
        field = current.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return list(current.model_fields)
        current = ann
    return list(current.model_fields)


def load_section(path: Path, name: str, model: type[S]) -> S:
    """Load one validated section of a params file."""
    return parse_section(load_params(path), name, model, source=str(path))
