"""The output folder of a training run: refuse to mix two runs in one folder."""
import os
import shutil

from .errors import UserError

# A folder holds a run once it has a checkpoint or results; a start that failed before training
# (bad data, say) leaves only its log and config, which a new run replaces.
RUN_MARKERS = ("last.pt", "best.pt", "metrics.json", "history.csv")
RUN_FILES = RUN_MARKERS + ("config.yaml", "roc.png", "train.log", "best_published.pkl",
                           "tensorboard")


def run_markers_in(folder):
    if not os.path.isdir(folder):
        return []
    return [name for name in RUN_MARKERS if os.path.exists(os.path.join(folder, name))]


def _remove(folder, names):
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def prepare(folder, resuming_here, overwrite):
    """Create ``folder``; refuse one that holds another run unless resuming it or
    ``overwrite`` (which removes that run's files, nothing else)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--out {folder} exists and is not a folder")
    found = run_markers_in(folder)
    if found and not resuming_here and not overwrite:
        raise UserError(f"output folder {folder} holds another run ({', '.join(found)}): "
                        f"pass --resume {folder} to continue it or --overwrite to replace it")
    os.makedirs(folder, exist_ok=True)
    if not resuming_here:
        _remove(folder, RUN_FILES)
    # Temporary files of a checkpoint write that was killed before its rename.
    for name in os.listdir(folder):
        if name.startswith(".") and ".tmp-" in name:
            os.remove(os.path.join(folder, name))
