"""95% intervals for the figures decisions rest on, by bootstrap over the test cells.

With 654 test cells one accuracy figure has a standard error near 1.7 points, so a single number
cannot say "better" or "not worse". Every headline quality figure gets a percentile-bootstrap
interval (resampling cells with replacement), and a variant is compared with a reference (the
teacher) *paired*: the same resampled cells score both, so the interval is for the difference, and
McNemar's exact test on the discordant cells gives its p-value (for balanced accuracy, which is no
proportion of cells, the two-sided paired-bootstrap p-value).

Draws come from numpy's PCG64 with a fixed seed and quantiles use numpy's default (linear) rule, so
the figures are the same on every machine: they are part of the evaluate stage's deterministic
detail.json. "Not worse than the reference" means the lower end of the paired interval for
(variant - reference) is at least -margin: the drop is at most `margin` at the upper end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

N_BOOT = 2000  # resamples; the interval ends move by ~0.1 point between seeds at 654 cells
SEED = 0
LEVEL = 0.95
# The figures with intervals: the ones gates, compare and bench decide on.
INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "defective_recall", "false_reject_rate")


@dataclass(frozen=True)
class Cells:
    """Per-cell outcomes on the test split, in one fixed order (shapes (N,))."""

    labels: np.ndarray  # int64 true class
    predicted: np.ndarray  # int64 predicted class (argmax)
    defective: np.ndarray  # bool: the true class is a defect
    flagged: np.ndarray  # bool: judged defective (argmax in a defective class, or p_defective >= threshold)
    num_classes: int


@dataclass(frozen=True)
class Interval:
    """A figure and its bootstrap interval, as fractions."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class PairedDiff:
    """variant - reference for one figure on the same cells: the difference, its interval and p-value."""

    diff: float
    low: float
    high: float
    p_value: float

    def points(self) -> dict[str, Any]:
        """The report form: {diff_pt, ci95_pt: [low, high], p_value}, differences in percentage points."""
        return {"diff_pt": round(100 * self.diff, 4), "ci95_pt": [round(100 * self.low, 4), round(100 * self.high, 4)],
                "p_value": round(self.p_value, 6)}


def cells_of(labels: np.ndarray, predicted: np.ndarray, defective_indices: Sequence[int], num_classes: int,
             flagged: np.ndarray | None = None) -> Cells:
    """Cells from labels and argmax predictions; `flagged` defaults to "argmax is a defective class"."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    defective = np.isin(labels, list(defective_indices))
    if flagged is None:
        flagged = np.isin(predicted, list(defective_indices))
    return Cells(labels, predicted, defective, np.asarray(flagged, dtype=bool), num_classes)


def draws(n: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """(n_boot, n) cell indices, each row one resample with replacement; row 0 is not special."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _rate(hits: np.ndarray, of: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per resample: hits among the `of` cells (0 where a resample has none of them)."""
    num, den = (hits & of)[idx].sum(axis=1), of[idx].sum(axis=1)
    return np.divide(num, den, out=np.zeros(len(idx)), where=den > 0)


def metric_samples(cells: Cells, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Each INTERVAL_METRICS figure on each resample `idx` (B, N) -> (B,). With idx = arange(N)[None]
    the figures equal lathe.measure.metrics' on the whole split."""
    correct = cells.labels == cells.predicted
    recalls = []
    for k in range(cells.num_classes):
        of = cells.labels == k
        support = of[idx].sum(axis=1)
        recalls.append(np.where(support > 0, (correct & of)[idx].sum(axis=1) / np.maximum(support, 1), np.nan))
    per_class = np.stack(recalls, axis=1)  # (B, K), NaN for a class absent from the resample
    present = ~np.isnan(per_class)
    balanced = np.where(present, per_class, 0.0).sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    return {
        "accuracy": correct[idx].mean(axis=1),
        "balanced_accuracy": balanced,
        "defective_recall": _rate(cells.flagged, cells.defective, idx),
        "false_reject_rate": _rate(cells.flagged, ~cells.defective, idx),
    }


def _ends(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def intervals(cells: Cells, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL) -> dict[str, Interval]:
    """Each INTERVAL_METRICS figure with its percentile-bootstrap interval."""
    n = len(cells.labels)
    whole = metric_samples(cells, np.arange(n)[None, :])
    boot = metric_samples(cells, draws(n, n_boot, seed))
    return {m: Interval(float(whole[m][0]), *_ends(boot[m], level)) for m in INTERVAL_METRICS}


def rate_intervals(defective: np.ndarray, flagged: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED,
                   level: float = LEVEL) -> dict[str, Interval]:
    """Defective recall and false-reject rate of a binary decision (`flagged`, e.g. p_defective >= a
    threshold) with their bootstrap intervals; the same resamples as `intervals` for that many cells."""
    defective, flagged = np.asarray(defective, dtype=bool), np.asarray(flagged, dtype=bool)
    n = len(defective)
    out = {}
    for name, of in (("defective_recall", defective), ("false_reject_rate", ~defective)):
        value = _rate(flagged, of, np.arange(n)[None, :])[0]
        out[name] = Interval(float(value), *_ends(_rate(flagged, of, draws(n, n_boot, seed)), level))
    return out


def _mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> float:
    """Exact two-sided McNemar p-value: the discordant cells are a fair coin under "no difference"."""
    from scipy.stats import binomtest  # scipy loads in ~0.3 s: only when a comparison is made

    a_only, b_only = int((a_right & ~b_right).sum()), int((~a_right & b_right).sum())
    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


def paired(variant: Cells, reference: Cells, n_boot: int = N_BOOT, seed: int = SEED,
           level: float = LEVEL) -> dict[str, PairedDiff]:
    """variant - reference for each INTERVAL_METRICS figure on the same cells (same order, same labels)."""
    if not np.array_equal(variant.labels, reference.labels):
        raise ValueError("paired comparison needs the same cells in the same order (labels differ)")
    n = len(variant.labels)
    whole = np.arange(n)[None, :]
    idx = draws(n, n_boot, seed)
    va, ra = metric_samples(variant, whole), metric_samples(reference, whole)
    vb, rb = metric_samples(variant, idx), metric_samples(reference, idx)
    # McNemar on the cells each figure counts: all cells, the defective ones (caught?), the good ones
    # (kept? a false reject is the error, so "right" is not flagged)
    good = ~variant.defective
    exact = {
        "accuracy": _mcnemar(variant.labels == variant.predicted, reference.labels == reference.predicted),
        "defective_recall": _mcnemar(variant.flagged[variant.defective], reference.flagged[variant.defective]),
        "false_reject_rate": _mcnemar(~variant.flagged[good], ~reference.flagged[good]),
    }
    out = {}
    for m in INTERVAL_METRICS:
        diff = vb[m] - rb[m]
        p = exact.get(m)
        if p is None:  # two-sided paired bootstrap: how often the resampled difference crosses zero,
            # at least 1/n_boot (the resolution of n_boot resamples)
            p = float(min(1.0, max(2 * min((diff <= 0).mean(), (diff >= 0).mean()), 1 / n_boot)))
        out[m] = PairedDiff(float(va[m][0] - ra[m][0]), *_ends(diff, level), p)
    return out


def not_worse(d: PairedDiff, margin: float = 0.01, higher_is_better: bool = True) -> bool:
    """The variant is not worse than the reference by more than `margin` at the unfavourable end."""
    return d.low >= -margin if higher_is_better else d.high <= margin


def interval_fields(found: dict[str, Interval], digits: int = 6) -> dict[str, float]:
    """Flat report keys: <metric>_ci95_low / <metric>_ci95_high."""
    out: dict[str, float] = {}
    for m, iv in found.items():
        out[f"{m}_ci95_low"], out[f"{m}_ci95_high"] = round(iv.low, digits), round(iv.high, digits)
    return out
