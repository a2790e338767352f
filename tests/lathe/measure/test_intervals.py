import numpy as np
import pytest
from scipy.stats import binomtest

from lathe.measure.intervals import (
    INTERVAL_METRICS,
    cells_of,
    interval_fields,
    intervals,
    metric_samples,
    not_worse,
    paired,
)
from lathe.measure.metrics import accuracy, balanced_accuracy, binary_defect_metrics, confusion_matrix

DEFECTIVE = [2, 3]


def noisy_predictions(n: int, right: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Labels over 4 unbalanced classes and predictions that are right with probability `right`."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(4, size=n, p=[0.5, 0.2, 0.1, 0.2])
    wrong = rng.random(n) >= right
    predicted = np.where(wrong, (labels + rng.integers(1, 4, size=n)) % 4, labels)
    return labels, predicted


def test_the_whole_split_gives_the_same_figures_as_the_metrics_module():
    labels, predicted = noisy_predictions(654, 0.75)
    cells = cells_of(labels, predicted, DEFECTIVE, 4)
    whole = {m: v[0] for m, v in metric_samples(cells, np.arange(654)[None, :]).items()}
    cm = confusion_matrix(labels, predicted, 4)
    binary = binary_defect_metrics(labels, predicted, DEFECTIVE)
    assert whole["accuracy"] == pytest.approx(accuracy(cm))
    assert whole["balanced_accuracy"] == pytest.approx(balanced_accuracy(cm))
    assert whole["defective_recall"] == pytest.approx(binary["defective_recall"])
    assert whole["false_reject_rate"] == pytest.approx(binary["false_reject_rate"])


def test_an_accuracy_interval_on_654_cells_is_about_plus_minus_3_points_and_holds_the_figure():
    labels, predicted = noisy_predictions(654, 0.75)
    found = intervals(cells_of(labels, predicted, DEFECTIVE, 4))
    acc = found["accuracy"]
    assert acc.low < acc.value < acc.high
    # binomial standard error sqrt(.75 * .25 / 654) = 1.7 points: the 95% interval is ~6.6 points wide
    assert 0.055 < acc.high - acc.low < 0.08
    assert set(found) == set(INTERVAL_METRICS)


def test_more_cells_give_narrower_intervals():
    small = intervals(cells_of(*noisy_predictions(100, 0.75), DEFECTIVE, 4))["accuracy"]
    large = intervals(cells_of(*noisy_predictions(10_000, 0.75), DEFECTIVE, 4))["accuracy"]
    assert (small.high - small.low) > 5 * (large.high - large.low)


def test_intervals_are_the_same_every_time():
    cells = cells_of(*noisy_predictions(654, 0.7), DEFECTIVE, 4)
    assert interval_fields(intervals(cells)) == interval_fields(intervals(cells))
    assert set(interval_fields(intervals(cells))) == {f"{m}_ci95_{e}" for m in INTERVAL_METRICS for e in ("low", "high")}


def test_a_variant_paired_with_itself_differs_by_nothing():
    cells = cells_of(*noisy_predictions(654, 0.75), DEFECTIVE, 4)
    for d in paired(cells, cells).values():
        assert (d.diff, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0)
        assert not_worse(d)


def test_fixing_thirty_cells_is_a_significant_gain_with_the_exact_mcnemar_p_value():
    labels, predicted = noisy_predictions(654, 0.75)
    better = predicted.copy()
    wrong = np.flatnonzero(better != labels)[:30]
    better[wrong] = labels[wrong]
    d = paired(cells_of(labels, better, DEFECTIVE, 4), cells_of(labels, predicted, DEFECTIVE, 4))["accuracy"]
    assert d.diff == pytest.approx(30 / 654)
    assert 0 < d.low < d.diff < d.high
    assert d.p_value == pytest.approx(binomtest(30, 30, 0.5).pvalue)
    assert d.p_value < 1e-6


def test_a_one_point_drop_with_a_wide_interval_is_not_proven_not_worse():
    labels, predicted = noisy_predictions(654, 0.75)
    worse = predicted.copy()
    right = np.flatnonzero(worse == labels)[:7]  # 7 cells: about one point
    worse[right] = (labels[right] + 1) % 4
    d = paired(cells_of(labels, worse, DEFECTIVE, 4), cells_of(labels, predicted, DEFECTIVE, 4))["accuracy"]
    assert d.diff == pytest.approx(-7 / 654)
    assert d.low < -0.01  # the unfavourable end of the drop is more than one point
    assert not not_worse(d)
    assert not_worse(d, margin=0.03)


def test_false_rejects_are_judged_with_lower_is_better():
    labels, predicted = noisy_predictions(654, 0.75)
    cells = cells_of(labels, predicted, DEFECTIVE, 4)
    flag_all = cells_of(labels, predicted, DEFECTIVE, 4, flagged=np.ones(654, dtype=bool))
    d = paired(flag_all, cells)["false_reject_rate"]
    assert d.diff > 0.5 and not not_worse(d, higher_is_better=False)
    assert paired(flag_all, cells)["defective_recall"].diff >= 0


def test_pairing_refuses_cells_in_another_order():
    labels, predicted = noisy_predictions(100, 0.75)
    a = cells_of(labels, predicted, DEFECTIVE, 4)
    b = cells_of(labels[::-1], predicted[::-1], DEFECTIVE, 4)
    with pytest.raises(ValueError, match="same cells"):
        paired(a, b)


def test_rate_intervals_of_a_threshold_decision_match_the_cell_intervals():
    from lathe.measure.intervals import rate_intervals

    labels, predicted = noisy_predictions(654, 0.75)
    cells = cells_of(labels, predicted, DEFECTIVE, 4)
    rates = rate_intervals(cells.defective, cells.flagged)
    found = intervals(cells)
    for m in ("defective_recall", "false_reject_rate"):
        assert rates[m] == found[m]


def test_the_package_gates_report_each_rate_with_its_interval():
    from lathe.ship.gates import rates_at

    labels, _ = noisy_predictions(654, 0.75)
    p_def = np.where(np.isin(labels, DEFECTIVE), 0.7, 0.3) + np.random.default_rng(2).normal(0, 0.2, 654)
    r = rates_at(p_def, labels, DEFECTIVE, 0.5)
    for m in ("defective_recall", "false_reject_rate"):
        assert r[f"{m}_ci95_low"] <= r[m] <= r[f"{m}_ci95_high"]
        assert r[f"{m}_ci95_high"] - r[f"{m}_ci95_low"] > 0.01
