import numpy as np
import pytest

from lathe.measure.metrics import (
    accuracy,
    average_precision,
    balanced_accuracy,
    binary_defect_metrics,
    confusion_matrix,
    macro_f1,
    per_class_recall,
    pr_curve,
    roc_auc,
)


def test_metrics_on_a_hand_computed_case():
    y = np.array([0, 0, 0, 1, 2, 3, 3, 3])
    p = np.array([0, 0, 1, 1, 0, 3, 3, 2])
    cm = confusion_matrix(y, p, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 2]]
    assert accuracy(cm) == 5 / 8
    np.testing.assert_allclose(per_class_recall(cm), [2 / 3, 1, 0, 2 / 3])
    assert abs(balanced_accuracy(cm) - (2 / 3 + 1 + 0 + 2 / 3) / 4) < 1e-12
    # F1 per class: 0: 2*2/(4+1+1)=2/3, 1: 2/(2+1)=2/3, 2: 0, 3: 4/(4+0+1)=0.8
    assert abs(macro_f1(cm) - (2 / 3 + 2 / 3 + 0 + 0.8) / 4) < 1e-12
    b = binary_defect_metrics(y, p, [2, 3])
    # defective truth: idx 4,5,6,7; predicted defective: 5,6,7 -> tp 3, fn 1 (idx 4), fp 0
    assert b["defective_recall"] == 0.75 and b["escape_rate"] == 0.25
    assert b["defective_precision"] == 1.0 and b["false_reject_rate"] == 0.0


def test_empty_classes_do_not_produce_nan():
    cm = confusion_matrix(np.array([0, 0]), np.array([0, 1]), 4)
    assert balanced_accuracy(cm) == 0.5 and not np.isnan(macro_f1(cm))
    assert binary_defect_metrics(np.array([0]), np.array([0]), 2)["defective_recall"] == 0.0


def test_roc_auc_is_the_chance_a_defect_outscores_a_good_cell_ties_counting_half():
    rng = np.random.default_rng(0)
    positive = rng.random(300) < 0.3
    score = np.round(np.where(positive, rng.normal(1, 1, 300), rng.normal(0, 1, 300)), 1)  # rounding makes ties
    pos, neg = score[positive], score[~positive]
    brute = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert roc_auc(positive, score) == pytest.approx(brute)
    assert roc_auc(positive, np.where(positive, 1.0, 0.0)) == 1.0
    assert roc_auc(np.zeros(5, dtype=bool), np.arange(5.0)) == 0.5


def test_the_pr_curve_steps_through_each_distinct_score_and_ends_at_full_recall():
    positive = np.array([True, False, True, True, False, False])
    score = np.array([0.9, 0.8, 0.8, 0.4, 0.3, 0.1])
    recall, precision, threshold = pr_curve(positive, score)
    assert threshold.tolist() == [0.9, 0.8, 0.4, 0.3, 0.1]
    assert recall.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    assert precision.tolist() == pytest.approx([1.0, 2 / 3, 3 / 4, 3 / 5, 1 / 2])
    assert average_precision(recall, precision) == pytest.approx(1 / 3 * 1.0 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 4)
