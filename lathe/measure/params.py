"""The measuring steps' params sections: evaluate, compare, and bench (`make bench`, not a stage)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lathe.config import Section


class EvaluateParams(Section):
    """How every model variant is judged through onnxruntime (quality on the test split, speed)."""

    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads (inter-op is 1, sequential)")
    latency_warmup: int = Field(20, ge=0, description="untimed batch-1 calls before timing")
    latency_runs: int = Field(300, ge=1, description="timed batch-1 calls; p50/p95 are taken over these")
    throughput_batch: int = Field(64, ge=1, le=4096, description="images per call for throughput (export allows <= 4096)")
    throughput_runs: int = Field(5, ge=1, description="timed calls at throughput_batch; the median is reported")


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
