import numpy as np

from lathe.measure.metrics import (
    accuracy,
    balanced_accuracy,
    binary_defect_metrics,
    confusion_matrix,
    macro_f1,
    per_class_recall,
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
