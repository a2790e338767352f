"""Typed, validated params: one pydantic model per params.yaml section.

Every model forbids extra keys so a typo fails at once with the key's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lathe.errors import ConfigError


# Where `lathe keys init` puts the signing pair, relative to the repository (git-ignored); the
# package stage's default key. One home: lathe.ship.signing imports it from here (config imports
# nothing of lathe but errors, so every stage does not depend on the signing code).
DEFAULT_PRIVATE_KEY = Path(".lathe/keys/signing-key.pem")
ENV_SIGNING_KEY = "LATHE_SIGNING_KEY"  # a private key file for the package stage (overrides package.private_key)


def signing_key_path(private_key: str | Path, root: Path) -> Path:
    """The package stage's signing key: env LATHE_SIGNING_KEY, else `private_key` (relative to `root`, the repo)."""
    key = Path(os.environ.get(ENV_SIGNING_KEY) or private_key)
    return key if key.is_absolute() else Path(root) / key

# numpy's and torch's generators take 0 <= seed < 2**32 (torch more, numpy's legacy one less)
Seed = Field(0, ge=0, le=2**32 - 1, description="random seed, 0 to 2**32 - 1")


class Section(BaseModel):
    """Base for params sections: unknown keys are errors, values are immutable."""

    # NaN and inf (YAML .nan, .inf, or 1.0e400, which overflows to inf) are never a setting
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class IngestParams(Section):
    image_size: int = Field(64, ge=8, le=1024, description="square side in pixels after resize")
    seed: int = Seed
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
    pixel_mean_min: float = Field(5.0, description="per-image mean of the source pixels on the 8-bit scale")
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

    # Set from the data (task.json: data.channels, data.classes) when a network is first built
    # (lathe.model.teacher.spec_for_task); a value written in params must agree with the data.
    in_channels: int = Field(1, ge=1)
    num_classes: int = Field(4, ge=2)
    stem_channels: int = Field(32, ge=1)
    stem_stride: int = Field(2, ge=1, le=4)
    stem_kernel: int = Field(3, ge=1, le=9, description="odd; >= stem_stride so no pixel is skipped")
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128, 256])
    blocks: list[int] = Field(default_factory=lambda: [1, 1, 1, 1])
    dropout: float = Field(0.1, ge=0, lt=1)
    # Optional per-block detail written by compression passes (pruning, low-rank). Left out of
    # model_dump() when unset, so an unpruned spec's arch.json stays byte-identical.
    mid_channels: list[int] | None = Field(
        None, exclude_if=lambda v: v is None,
        description="conv1 output channels of every block, in order (default: the block's width)",
    )
    projection: list[bool] | None = Field(
        None, exclude_if=lambda v: v is None,
        description="per block: 1x1 conv-BN shortcut (true) or identity (false); default: projection "
                    "where the block changes stride or width",
    )
    ranks: dict[str, int] | None = Field(
        None, exclude_if=lambda v: v is None,
        description="low-rank factorisation: conv/linear layer name (e.g. features.0.conv1) -> rank",
    )

    def block_shapes(self) -> list[tuple[int, int, int]]:
        """(cin, cout, stride) of every block, in order."""
        shapes, cin = [], self.stem_channels
        for i, (width, blocks) in enumerate(zip(self.widths, self.blocks)):
            for b in range(blocks):
                shapes.append((cin, width, 2 if (i > 0 and b == 0) else 1))
                cin = width
        return shapes

    @model_validator(mode="after")
    def _per_block_lists(self) -> "ArchSpec":
        if len(self.widths) != len(self.blocks):
            return self  # _stages_match reports it
        n = sum(self.blocks)
        for key in ("mid_channels", "projection"):
            value = getattr(self, key)
            if value is not None and len(value) != n:
                raise ValueError(f"{key} has {len(value)} entries but blocks {self.blocks} make {n} blocks: "
                                 "one entry per block, in order")
        if self.mid_channels is not None and any(c < 1 for c in self.mid_channels):
            raise ValueError(f"mid_channels {self.mid_channels}: every block needs at least 1 channel")
        if self.projection is not None:
            for j, ((cin, cout, stride), proj) in enumerate(zip(self.block_shapes(), self.projection)):
                if not proj and (cin != cout or stride != 1):
                    raise ValueError(f"projection[{j}] is false (identity shortcut) but block {j} changes shape "
                                     f"({cin} -> {cout} channels, stride {stride}); it needs a projection")
        if self.ranks is not None and any(r < 1 for r in self.ranks.values()):
            raise ValueError(f"ranks {self.ranks}: every rank must be >= 1")
        return self

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


class FitParams(Section):
    """How a network is trained or fine-tuned (shared by the teacher, pruning, distillation, low-rank)."""

    seed: int = Seed
    threads: int = Field(2, ge=1)
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, description="peak of the one-cycle schedule")
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    class_weighting: Literal["none", "sqrt_inverse", "inverse"] = "sqrt_inverse"
    ema_decay: float = Field(0.0, ge=0, lt=1, description="0 disables the weight EMA")
    select_on: Literal["score", "accuracy"] = Field(
        "score", description="epoch selection on val: accuracy + 0.25 * (balanced accuracy + defective recall), "
                             "or accuracy alone")
    augment: AugmentParams = AugmentParams()


class EnsembleParams(Section):
    """Train several teachers and distil their average into the one the pipeline keeps.

    Members differ only in seed (seed, seed + 1, ...). Their averaged prediction is more accurate
    than any one of them, and the distilled network keeps most of that gain at one network's size,
    so prune, distill and low-rank still start from a single network.
    """

    members: int = Field(1, ge=1, le=16, description="1 trains one network (no ensemble)")
    temperature: float = Field(2.0, gt=0, description="softening of the members' averaged distribution")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft (ensemble) loss; 1 - alpha on the labels")
    epochs: int | None = Field(None, ge=1, description="epochs of the distilled network (default: the members' epochs)")
    parallel: int = Field(1, ge=1, le=16, description="members trained at once, each in its own process with `threads` "
                          "threads; changes no byte (a member's bytes depend on its seed and `threads` only)")
    threads: int | None = Field(None, ge=1, le=256, description="intra-op threads of the distilled network, which trains "
                                "alone after the members (default: the members' `threads`); part of the result")


class TrainParams(FitParams):
    """The teacher: an architecture plus how to train it."""

    arch: ArchSpec = ArchSpec()
    ensemble: EnsembleParams = EnsembleParams()


Importance = Literal["l1", "l2", "random"]


class PruneParams(Section):
    """Structured channel pruning of the teacher (Li et al. 2017), iterative prune + fine-tune."""

    importance: Importance = Field("l1", description="filter importance: l1 / l2 norm, or random (a control)")
    target: Literal["macs", "channels"] = Field("macs", description="what `ratio` removes a fraction of")
    ratio: float = Field(0.5, gt=0, lt=1, description="fraction of MACs (or channels) to remove")
    steps: int = Field(3, ge=1, description="prune + fine-tune rounds that reach `ratio` together")
    round_to: int = Field(1, ge=1, description="kept channels per layer are a multiple of this")
    finetune: FitParams = FitParams(epochs=2, lr=5e-4)


class DistillParams(FitParams):
    """Knowledge distillation (Hinton et al. 2015) into a small student.

    Read by two stages: `distill`, and the control (`--control`) that trains the same student on the
    same budget without the teacher; the control ignores `temperature` and `alpha`.
    """

    student: ArchSpec = Field(
        ArchSpec(stem_channels=16, widths=[16, 24, 48, 64]),  # 115k params, ~11x below the 1.23M teacher
        description="the student's architecture; ignored when init is 'pruned' (the pruned arch.json decides)",
    )
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the soft (teacher) loss; 1 - alpha on the labels")
    init: Literal["scratch", "pruned"] = Field("scratch", description="start the student from scratch or from models/pruned")


class LowRankParams(Section):
    """Truncated-SVD factorisation of conv/linear layers plus fine-tune."""

    energy: float = Field(0.9, gt=0, le=1, description="keep the smallest rank holding this fraction of squared singular values")
    min_channels: int = Field(16, ge=1, description="layers with fewer output channels are left whole")
    finetune: FitParams = FitParams(epochs=3, lr=5e-4)


class QuantizeParams(Section):
    """onnxruntime static INT8 (QDQ) after quant_pre_process, calibrated on a seeded train subset."""

    seed: int = Seed
    calibration_size: int = Field(256, ge=1, description="train samples used for calibration")
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = Field(99.999, gt=50, le=100, description="method=percentile: keep this % of |values|")
    histogram_bins: int = Field(2048, ge=256, le=16384,
                                description="entropy/percentile histogram bins; entropy's search time grows with it")
    per_channel: bool = True
    activation_type: Literal["quint8", "qint8"] = Field("quint8", description="quint8 fuses residual convs here (measured)")
    weight_type: Literal["qint8", "quint8"] = "qint8"

    @model_validator(mode="after")
    def _supported_types(self) -> "QuantizeParams":
        if self.activation_type == "qint8" and self.weight_type == "quint8":
            raise ValueError("activation_type qint8 with weight_type quint8 is not supported by onnxruntime; "
                             "use weight_type qint8")
        return self


class EvaluateParams(Section):
    """How every model variant is judged through onnxruntime (quality on the test split, speed)."""

    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads (inter-op is 1, sequential)")
    latency_warmup: int = Field(20, ge=0, description="untimed batch-1 calls before timing")
    latency_runs: int = Field(300, ge=1, description="timed batch-1 calls; p50/p95 are taken over these")
    throughput_batch: int = Field(64, ge=1, le=4096, description="images per call for throughput (export allows <= 4096)")
    throughput_runs: int = Field(5, ge=1, description="timed calls at throughput_batch; the median is reported")


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


class CompareParams(Section):
    """The side-by-side table of evaluated variants (reports/compare.*) and its Pareto plot."""

    pareto_metric: Literal["accuracy", "balanced_accuracy", "defective_recall"] = Field(
        "accuracy", description="quality axis of the Pareto front and plot (higher is better)")
    plot_dpi: int = Field(120, ge=50, le=600, description="resolution of reports/pareto.png")


class BenchParams(Section):
    """`make bench`: pipeline INT8 variants against the FP32 teacher and do-it-yourself baselines, one machine."""

    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads for latency and the int8 matmul probe")
    warmup: int = Field(50, ge=0, description="untimed round-robin rounds before timing")
    runs: int = Field(300, ge=300, description="timed round-robin rounds; p50 is the median of these (>= 300 by design)")
    matmul_repeats: int = Field(50, ge=5, description="timed calls per shape of the int8 matmul probe (median)")
    min_size_ratio: float = Field(25.0, gt=0, description="acceptance: teacher bytes / variant bytes at least this")
    min_latency_ratio: float = Field(5.0, gt=0, description="acceptance: teacher p50 / variant p50 at least this")
    max_accuracy_drop_pt: float = Field(1.0, ge=0, description="acceptance: 4-class accuracy drop vs teacher, points")
    max_recall_drop_pt: float = Field(1.0, ge=0, description="acceptance: defective-recall drop vs teacher, points")


ALL_VARIANTS = ["teacher", "pruned", "student", "student_control", "lowrank",
                "quantized/teacher", "quantized/pruned", "quantized/student", "quantized/student_control",
                "quantized/lowrank"]
TARGET_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # a folder name and a dvc.yaml foreach key
# How a target picks among the variants passing all its gates (ranking and tie-breaks: lathe.ship.gates.RANKS)
SelectionPolicy = Literal["smallest", "fastest", "most_accurate"]


class GateParams(Section):
    """A target's acceptance gates in plant terms; a gate left null is not checked (but reported)."""

    max_size_bytes: int | None = Field(None, ge=1, description="whole model on disk, bytes")
    max_latency_p50_ms: float | None = Field(None, gt=0, description="batch-1 p50 as the evaluate stage measured it here")
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
    def _safe_variants(self) -> "PackageParams":
        for v in self.variants:
            parts = v.split("/")
            if v.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"variant {v!r} must be a relative path below models/ (e.g. quantized/student)")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants are listed twice: {self.variants}")
        return self


def parse_targets(params: dict, source: str = "params.yaml") -> dict[str, TargetParams]:
    """params['targets'] (a mapping name -> profile) validated; errors name `targets.<name>.<key>`."""
    import re

    raw = params.get("targets")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: section 'targets' must be a non-empty mapping of target name -> profile")
    out: dict[str, TargetParams] = {}
    for name, profile in raw.items():
        if not isinstance(name, str) or not re.match(TARGET_NAME, name):
            raise ConfigError(f"{source}: target name {name!r} must match {TARGET_NAME} (it names a folder)")
        out[name] = parse_section({f"targets.{name}": profile}, f"targets.{name}", TargetParams, source)
    return out
