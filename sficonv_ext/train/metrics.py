"""Detection metrics from the full ROC (scikit-learn, ``drop_intermediate=False``).

- ``acc``: accuracy of the given predictions (argmax of the logits), else of ``score > 0.5``.
- ``auc``, ``ap``: ROC AUC and average precision.
- ``eer``: where the piecewise-linear ROC crosses ``FNR = FPR``; tied scores form one diagonal
  segment of the ROC, so ties are counted as the expected value of breaking them at random.
- ``tpr_at_fpr``: the highest TPR among thresholds whose FPR does not exceed the target: an
  operating point that a threshold actually achieves (no interpolation across a tie).
Metrics that need both classes are None (JSON null) when one is missing.
"""
from collections import OrderedDict

import numpy as np

FPR_TARGETS = OrderedDict([("1e-2", 1e-2), ("1e-3", 1e-3), ("1e-4", 1e-4)])


def roc(labels, scores):
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return fpr, tpr


def equal_error_rate(fpr, tpr):
    """Error rate where the ROC (linear between points) meets the line ``tpr = 1 - fpr``."""
    gap = tpr + fpr - 1.0  # FPR - FNR: rises from -1 at (0, 0) to 1 at (1, 1)
    i = int(np.argmax(gap >= 0.0))
    if i == 0 or gap[i] == 0.0:
        return float(fpr[i])
    t = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def tpr_at_fpr(fpr, tpr, target):
    # A relative tolerance so that FPR = k / n compares equal to a target of exactly k / n.
    allowed = fpr <= target * (1.0 + 1e-9)
    return float(tpr[allowed].max())


def binary_metrics(labels, scores, predictions=None):
    """Metrics of ``scores`` against 0/1 ``labels``: any score that rises with the chance of
    fake ranks the same; without ``predictions``, ``scores`` must be probabilities (for
    accuracy, ``score > 0.5``)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    n = int(labels.size)
    out = OrderedDict(acc=None, auc=None, ap=None, eer=None,
                      tpr_at_fpr=OrderedDict((k, None) for k in FPR_TARGETS), n=n)
    if n == 0:
        return out
    if predictions is None:
        predictions = (scores > 0.5).astype(np.int64)
    out["acc"] = float(np.mean(np.asarray(predictions) == labels))
    if np.unique(labels).size < 2:
        return out  # AUC, AP, EER and TPR at FPR are undefined with one class
    out["auc"] = float(roc_auc_score(labels, scores))
    out["ap"] = float(average_precision_score(labels, scores))
    fpr, tpr = roc(labels, scores)
    out["eer"] = equal_error_rate(fpr, tpr)
    out["tpr_at_fpr"] = OrderedDict((k, tpr_at_fpr(fpr, tpr, v)) for k, v in FPR_TARGETS.items())
    return out


def mean_probability_log_odds(margins):
    """The log-odds of the mean of ``sigmoid(margins)``, without forming the probabilities: a
    mean probability is exactly 1.0 in float64 beyond a margin of about 37, which would tie
    confident fakes with confident false positives. Rises with the mean probability."""
    margins = np.asarray(margins, dtype=np.float64)
    log_p = -np.logaddexp(0.0, -margins)    # log sigmoid(m)
    log_q = -np.logaddexp(0.0, margins)     # log (1 - sigmoid(m))
    return float(np.logaddexp.reduce(log_p) - np.logaddexp.reduce(log_q))


def video_scores(videos, labels, scores, reduce=np.mean):
    """``reduce`` of the frame scores per video (default: the mean):
    ``(video ids, video labels, video scores)``.

    Raises ValueError if a video's frames disagree on the label.
    """
    members = OrderedDict()
    for v, y, s in zip(videos, labels, scores):
        members.setdefault(v, []).append((int(y), float(s)))
    ids, video_labels, means = [], [], []
    for v, frames in members.items():
        frame_labels = {y for y, _ in frames}
        if len(frame_labels) != 1:
            raise ValueError(f"video {v!r} has frames labelled both real and fake")
        ids.append(v)
        video_labels.append(frame_labels.pop())
        means.append(float(reduce(np.array([s for _, s in frames]))))
    return ids, np.array(video_labels), np.array(means)


def undefined_reason(metrics):
    """A sentence for the log when some metrics are undefined, else None."""
    if metrics["n"] == 0:
        return "no images to score: every metric is undefined"
    if metrics["auc"] is None:
        return ("only one class present: AUC, AP, EER and TPR at FPR are undefined (null); "
                "accuracy is reported")
    return None
