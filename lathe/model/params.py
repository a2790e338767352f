"""The model params: the architecture, how a network is trained (shared by every training stage), the teacher."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from lathe.config import Section, Seed


class ArchSpec(Section):
    """A small ResNet-style CNN: stem conv, stages of basic blocks, global pooling, linear head."""

    # The family is arch.json's top-level "family" (one home), never part of the dumped spec.
    family: Literal["resnet_like"] = Field("resnet_like", exclude=True)
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
    # How the last feature map becomes one vector. "max" keeps the strongest local response: a defect a few
    # pixels wide (a dark spot or crack end on a poly cell) is not averaged away over the whole cell
    # (docs/teacher-experiments.md, 2026-12-04). Left out of model_dump() when "avg", so the arch.json of
    # every model trained before it stays byte-identical.
    pool: Literal["avg", "max"] = Field("avg", exclude_if=lambda v: v == "avg")
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
    def _per_block_lists(self) -> ArchSpec:
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
    def _stages_match(self) -> ArchSpec:
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


IMAGENET_WEIGHTS = "efficientnet-lite0-imagenet"  # its key in lathe.model.pretrained.PRETRAINED


class LiteSpec(Section):
    """EfficientNet-Lite on ImageNet weights (lathe.model.lite.LiteNet): a teacher that starts from
    features learnt on 1.3M photographs instead of from the plant's few thousand cells."""

    family: Literal["efficientnet_lite"] = Field("efficientnet_lite", exclude=True)
    in_channels: int = Field(1, description="1 (grey, repeated to RGB inside) or 3; set from the data")
    num_classes: int = Field(4, ge=2)
    weights: str = Field(IMAGENET_WEIGHTS, description="the pinned ImageNet weights (a key of "
                                                       "lathe.model.pretrained.PRETRAINED)")
    frozen_blocks: int = Field(8, ge=-1, le=16, description="the stem and the first K of the 16 blocks keep "
                               "ImageNet's weights and statistics while training; -1 trains every layer")
    # Not the bytes of a run without it: oneDNN's blocking over the batch makes the frozen layers' last bits depend
    # on the batch they run in (measured: 32 cells at once vs 8 at a time differ at 1 thread), and the memo's
    # batches are not training's. Deterministic either way; part of the recipe, so it is in the model's spec.
    memoize_frozen: bool = Field(True, description="compute the frozen layers' output once per cell instead of every "
                                 "epoch (a third of the time per epoch at 224 px); used for the cells no augmentation "
                                 "altered")
    dropout: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _grey_or_rgb(self) -> LiteSpec:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels {self.in_channels}: an ImageNet network takes grey (1) or RGB (3) cells")
        return self


def family_of(value: Any) -> str:
    """The `family` of an architecture given as params (a dict) or as a spec; resnet_like when unsaid."""
    family = value.get("family", "resnet_like") if isinstance(value, dict) else getattr(value, "family", None)
    return family if isinstance(family, str) else "resnet_like"


# A teacher's architecture: which network family, told apart by `family` (resnet_like when absent)
TeacherSpec = Annotated[Annotated[ArchSpec, Tag("resnet_like")] | Annotated[LiteSpec, Tag("efficientnet_lite")],
                        Discriminator(family_of)]


def arch_mismatches(spec: ArchSpec | LiteSpec, channels: int, num_classes: int) -> list[tuple[str, int, int, str]]:
    """Where an architecture set explicitly in params contradicts the data: (field, value in params,
    value of the data, the data's params key) per field. Fields left unset are filled from the data."""
    facts = {"in_channels": (channels, "data.channels"), "num_classes": (num_classes, "data.classes")}
    return [(name, getattr(spec, name), value, origin) for name, (value, origin) in facts.items()
            if name in spec.model_fields_set and getattr(spec, name) != value]


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
    # Left out of model_dump() when 0, so the training records of models trained without it stay byte-identical.
    sam_rho: float = Field(0.0, ge=0, le=10, exclude_if=lambda v: v == 0.0,
                           description="sharpness-aware minimisation: the L2 radius of the weight perturbation "
                                       "(Foret et al. 2021); 0 disables; each step costs two passes")
    # Left out of model_dump() when 0, as sam_rho.
    mixup: float = Field(0.0, ge=0, le=10, exclude_if=lambda v: v == 0.0,
                         description="mixup (Zhang et al. 2018): each batch is blended with a shuffled copy of "
                                     "itself at a ratio drawn from Beta(mixup, mixup), the loss blended alike; 0 disables")
    select_on: Literal["score", "accuracy"] = Field(
        "score", description="epoch selection on val: accuracy + 0.25 * (balanced accuracy + defective recall), "
                             "or accuracy alone")
    augment: AugmentParams = AugmentParams()

    @model_validator(mode="after")
    def _mixup_without_sam(self) -> FitParams:
        # SAM's second pass computes the loss of one label per cell; a mixed batch has two
        if self.mixup > 0 and self.sam_rho > 0:
            raise ValueError(f"mixup ({self.mixup}) and sam_rho ({self.sam_rho}) cannot be combined: set one to 0")
        return self


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

    arch: TeacherSpec = ArchSpec()
    ensemble: EnsembleParams = EnsembleParams()
