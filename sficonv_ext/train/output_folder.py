"""The output folder of a training run: refuse to mix two runs in one folder."""
import os
import shutil

from .errors import UserError

# A folder holds a run once it has a checkpoint or results; a start that failed before training
# (bad data, say) leaves only its log and config, which a new run replaces.
TRAINING_ONLY = ("last.pt", "best.pt", "history.csv")  # what eval never writes
RUN_MARKERS = TRAINING_ONLY + ("metrics.json",)
# The first line of every config.yaml a run writes: how a folder left by a failed start of ours
# is told from a user's own files.
CONFIG_HEADER = "# sficonv train: the options of this run"
RUN_FILES = RUN_MARKERS + ("config.yaml", "roc.png", "train.log", "best_published.pkl",
                           "tensorboard")


def run_markers_in(folder, markers=RUN_MARKERS):
    if not os.path.isdir(folder):
        return []
    return [name for name in markers if os.path.exists(os.path.join(folder, name))]


def _remove(folder, names):
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def written_by_us(folder):
    """Whether ``folder``'s config.yaml is one a run of ours wrote (it starts with
    CONFIG_HEADER)."""
    try:
        with open(os.path.join(folder, "config.yaml"), encoding="utf-8") as f:
            return f.readline().rstrip("\n") == CONFIG_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def refuse_inside_data(out, *data):
    """Refuse an output folder inside a data folder: its files (roc.png) would be read back as
    images of that data set by the next run, a class's images if under real/ or fake/."""
    target = os.path.realpath(out)
    for folder in data:
        if not folder or folder == "builtin" or not os.path.isdir(folder):
            continue
        root = os.path.realpath(folder)
        if target == root or target.startswith(root + os.sep):
            raise UserError(f"--out {out} is inside the data folder {folder}: its files would "
                            f"be read as images of that data set; choose an --out outside it")


def prepare(folder, resuming_here, overwrite):
    """Create ``folder``; refuse one that holds another run unless resuming it or
    ``overwrite`` (which removes that run's files, nothing else). Without ``overwrite`` only
    what a start of ours that failed before training left (its log, config and TensorBoard
    folder, recognised by the config's header) is replaced; files of the same names that are
    not ours are refused, never deleted."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--out {folder} exists and is not a folder")
    found = run_markers_in(folder)
    if found and not resuming_here and not overwrite:
        raise UserError(f"output folder {folder} holds another run ({', '.join(found)}): "
                        f"pass --resume {folder} to continue it or --overwrite to replace it")
    if not resuming_here and not overwrite and os.path.isdir(folder):
        clashes = [n for n in RUN_FILES if os.path.exists(os.path.join(folder, n))]
        if clashes and not written_by_us(folder):
            raise UserError(f"output folder {folder} already holds {', '.join(clashes)}, which "
                            f"a run writes: pass --overwrite to replace them or choose another "
                            f"--out")
    os.makedirs(folder, exist_ok=True)
    if not resuming_here:
        _remove(folder, RUN_FILES)
    # Temporary files of a checkpoint write that was killed before its rename.
    for name in os.listdir(folder):
        if name.startswith(".") and ".tmp-" in name:
            os.remove(os.path.join(folder, name))
