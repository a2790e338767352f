"""The compression stages' params sections: prune (and prune_baseline), distill, lowrank, quantize, qat."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lathe.config import Section, Seed
from lathe.model.params import ArchSpec, FitParams

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
    bias_correction: bool = Field(True, description="cancel the mean shift of weight rounding in each conv's bias "
                                                    "(lathe.compress.bias_correction)")
    sequential_bias_correction: bool = Field(
        False, description="then match each conv's output mean to the float model's, conv by conv on the INT8 "
                           "chain: one calibration pass per conv; helps deep depthwise networks at high resolution")

    @model_validator(mode="after")
    def _supported_types(self) -> QuantizeParams:
        if self.activation_type == "qint8" and self.weight_type == "quint8":
            raise ValueError("activation_type qint8 with weight_type quint8 is not supported by onnxruntime; "
                             "use weight_type qint8")
        return self


class QatParams(FitParams):
    """Quantization-aware fine-tuning (lathe.compress.qat) of a trained float network, distilled from the
    teacher like the distill stage (alpha = 0: the labels alone).

    A short, gentle fine-tune: the network is already trained, so a few epochs at a tenth of its
    learning rate let its weights settle on the INT8 grid without forgetting.
    """

    epochs: int = Field(4, ge=1)
    lr: float = Field(3e-4, gt=0, description="peak of the one-cycle schedule")
    select_on: Literal["score", "accuracy"] = "accuracy"
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft (teacher) loss; 1 - alpha on the labels")
