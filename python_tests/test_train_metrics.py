"""Metric functions against hand-computed cases, ties included."""
import math

import numpy as np
import pytest

from sficonv_ext.train.metrics import (binary_metrics, equal_error_rate, roc, tpr_at_fpr,
                                       video_scores)



def close(a, b):
    return a is not None and math.isclose(a, b, rel_tol=0, abs_tol=1e-12)


def test_perfect_separation():
    m = binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert m["acc"] == 1.0 and m["auc"] == 1.0 and m["ap"] == 1.0 and m["eer"] == 0.0
    assert m["tpr_at_fpr"] == {"1e-2": 1.0, "1e-3": 1.0, "1e-4": 1.0}
    assert m["n"] == 4


def test_textbook_case():
    # ROC points: (0,0) (0,.5) (.5,.5) (.5,1) (1,1); the anti-diagonal meets it at (.5,.5).
    m = binary_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert close(m["auc"], 0.75)
    assert close(m["ap"], (1 / 2) * 1 + (1 / 2) * (2 / 3))  # recall steps 0.5 at P=1, 0.5 at 2/3
    assert close(m["eer"], 0.5)
    assert close(m["tpr_at_fpr"]["1e-2"], 0.5)
    assert close(m["acc"], 0.75)  # only the fake scored 0.35 falls on the wrong side


def test_ties_form_one_diagonal_segment():
    # negatives 0.2, 0.6, 0.1; positives 0.6, 0.6, 0.9. ROC: (0,0) (0,1/3) (1/3,1) (2/3,1) (1,1).
    labels = [0, 1, 1, 0, 1, 0]
    scores = [0.2, 0.6, 0.6, 0.6, 0.9, 0.1]
    m = binary_metrics(labels, scores)
    # AUC: 0.9 beats 3 negatives; each 0.6 beats 2 and ties 1 (counts 1/2): (3 + 2 * 2.5) / 9.
    assert close(m["auc"], 8 / 9)
    # The tie segment from (0, 1/3) to (1/3, 1) crosses tpr = 1 - fpr at fpr = 2/9.
    assert close(m["eer"], 2 / 9)
    # No threshold reaches FPR <= 1e-2 inside the tie: the best achievable TPR is 1/3.
    assert all(close(v, 1 / 3) for v in m["tpr_at_fpr"].values())


def test_all_scores_tied():
    m = binary_metrics([0, 1, 0, 1], [0.5] * 4)
    assert close(m["auc"], 0.5) and close(m["eer"], 0.5)
    assert m["tpr_at_fpr"]["1e-2"] == 0.0
    assert m["acc"] == 0.5  # 0.5 is not above 0.5: everything called real


def test_eer_between_points_is_interpolated():
    fpr = np.array([0.0, 0.2, 0.6, 1.0])
    tpr = np.array([0.0, 0.6, 0.9, 1.0])
    # Gap tpr + fpr - 1 is -0.2 at (0.2, 0.6) and 0.5 at (0.6, 0.9): t = 0.2 / 0.7.
    assert close(equal_error_rate(fpr, tpr), 0.2 + (0.2 / 0.7) * 0.4)


def test_tpr_at_fpr_includes_exact_target():
    # 100 negatives; one scores above every positive, so FPR 1/100 is reached with TPR 1.
    labels = [0] * 100 + [1] * 10
    scores = [0.0] * 99 + [1.0] + [0.9] * 10
    fpr, tpr = roc(labels, scores)
    assert tpr_at_fpr(fpr, tpr, 1e-2) == 1.0
    assert tpr_at_fpr(fpr, tpr, 1e-3) == 0.0
    m = binary_metrics(labels, scores)
    assert m["tpr_at_fpr"]["1e-2"] == 1.0 and m["tpr_at_fpr"]["1e-4"] == 0.0


def test_predictions_override_threshold():
    m = binary_metrics([0, 1], [0.6, 0.4], predictions=[0, 1])
    assert m["acc"] == 1.0
    assert binary_metrics([0, 1], [0.6, 0.4])["acc"] == 0.0


def test_one_class_and_empty():
    m = binary_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert close(m["acc"], 2 / 3)
    assert m["auc"] is None and m["ap"] is None and m["eer"] is None
    assert m["tpr_at_fpr"] == {"1e-2": None, "1e-3": None, "1e-4": None}
    empty = binary_metrics([], [])
    assert empty["n"] == 0 and empty["acc"] is None


def test_video_scores_average_frames():
    ids, labels, means = video_scores(["a", "b", "a", "b"], [0, 1, 0, 1], [0.2, 0.9, 0.4, 0.5])
    assert ids == ["a", "b"] and labels.tolist() == [0, 1]
    assert np.allclose(means, [0.3, 0.7])
    with pytest.raises(ValueError, match="video 'a'"):
        video_scores(["a", "a"], [0, 1], [0.1, 0.2])
