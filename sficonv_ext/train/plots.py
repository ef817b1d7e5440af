"""ROC curve as a PNG, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""
import os

from .metrics import roc


def save_roc_png(labels, scores, path, title="ROC", auc=None):
    """Write the ROC of ``scores`` to ``path`` (atomically); False if it is undefined."""
    if len(set(int(y) for y in labels)) < 2:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fpr, tpr = roc(labels, scores)
    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    label = f"AUC = {auc:.4f}" if auc is not None else None
    axes.plot(fpr, tpr, lw=1.5, label=label)
    axes.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("false positive rate (real called fake)")
    axes.set_ylabel("true positive rate (fake detected)")
    axes.set_title(title)
    if label:
        axes.legend(loc="lower right")
    figure.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}"
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    return True
