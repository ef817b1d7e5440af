"""What a run tells the user and leaves on disk: log lines, the per-epoch CSV, TensorBoard
scalars, metrics.json. Only rank 0 prints or writes."""
import csv
import io
import json
import os
import sys


def write_atomic_text(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # a failed write or rename leaves no stray file
            os.remove(tmp)


def write_json(path, obj):
    write_atomic_text(path, json.dumps(obj, indent=2) + "\n")


class Reporter:
    def __init__(self, is_main, out_dir=None, log_name="train.log", tensorboard=False,
                 stream=None):
        self.is_main, self.out_dir = is_main, out_dir
        self.stream = stream  # where log lines go; None: stdout
        self.log_path = os.path.join(out_dir, log_name) if (out_dir and is_main) else None
        self.writer = None
        if tensorboard and is_main and out_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass  # tensorboard is optional
            else:
                self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def log(self, message):
        if not self.is_main:
            return
        from tqdm import tqdm

        stream = self.stream or sys.stdout
        tqdm.write(message, file=stream)
        stream.flush()
        self.log_to_file(message)

    def log_to_file(self, message):
        """A line for the log file alone (the command prints its own error)."""
        if self.is_main and self.log_path:
            with open(self.log_path, "a", encoding="utf-8", errors="surrogateescape") as f:
                f.write(message + "\n")

    def history_csv(self, rows):
        """Rewrite the per-epoch CSV from the full history (kept in the checkpoint, so a
        resumed run never loses or repeats a row)."""
        if not (self.is_main and self.out_dir and rows):
            return
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic_text(os.path.join(self.out_dir, "history.csv"), buffer.getvalue())

    def scalars(self, step, values):
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def flat_metrics(metrics, prefix="val_"):
    """``{"val_acc": ..., "val_tpr@1e-2": ...}`` for the CSV and TensorBoard."""
    out = {}
    for key, value in metrics.items():
        if key == "tpr_at_fpr":
            out.update({f"{prefix}tpr@{k}": v for k, v in value.items()})
        elif key == "video":
            out.update(flat_metrics(value, prefix + "video_"))
        elif isinstance(value, (int, float)) or value is None:
            out[prefix + key] = value
    return out


def summary(metrics):
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"
    tpr = metrics["tpr_at_fpr"]
    text = (f"acc {fmt(metrics['acc'])}  auc {fmt(metrics['auc'])}  ap {fmt(metrics['ap'])}  "
            f"eer {fmt(metrics['eer'])}  tpr@1e-2 {fmt(tpr['1e-2'])}  n {metrics['n']}")
    if "video" in metrics:
        text += f"  video auc {fmt(metrics['video']['auc'])} ({metrics['video']['n']} videos)"
    return text
