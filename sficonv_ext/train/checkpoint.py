"""Checkpoints: written atomically, loaded safely (``weights_only``), exported to the published
layout.

A training checkpoint is a dict with ``format == FORMAT`` holding the model (own layout), the
optimizer, scheduler and grad-scaler states, the position in training (epoch, step within the
epoch, which fixes the sampler position), RNG states, the best metric so far, the per-epoch
history and the resolved configuration. Anything else loadable is taken as a bare state_dict in
one of the layouts the model accepts (own, published training wrapper ``best.pkl``, bare).
"""
import contextlib
import os
import random
import re
import shutil

import numpy as np
import torch

from .. import models
from .errors import UserError

FORMAT = "sficonv_ext.train"
VERSION = 1
LAST, BEST = "last.pt", "best.pt"


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replaced_atomically(path):
    """Yields a temporary path in ``path``'s folder to write; on success it is renamed over
    ``path`` and the folder synced: a crash at any point leaves either the old file or the new
    one, never a torn one. The temporary file never outlives the block."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(folder)


def atomic_save(obj, path):
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    try:
        with _replaced_atomically(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as error:
        # torch's zip writer turns a full disk into "[enforce fail at inline_container.cc...]
        # unexpected pos ...": say what happened. Other RuntimeErrors are not about the disk.
        if isinstance(error, RuntimeError) and not _is_zip_write_error(error):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        raise UserError(f"could not write {path}: {error}; {_free_space(folder)} free on that "
                        f"disk (the previous {os.path.basename(path)}, if any, is kept)") from error


def atomic_copy(source, path):
    """Copy ``source`` over ``path`` the way :func:`atomic_save` writes: never a torn file."""
    try:
        with _replaced_atomically(path) as tmp:
            shutil.copy2(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
    except OSError as error:
        raise UserError(f"could not copy {source} to {path}: {error} (the previous "
                        f"{os.path.basename(path)}, if any, is kept)") from error


def _is_zip_write_error(error):
    text = str(error)
    return "inline_container" in text or "PytorchStreamWriter" in text


def _free_space(folder):
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB"
    except OSError:
        return "unknown space"


def rng_state():
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray; stored as a tensor so weights_only loading accepts it.
        "numpy": {"key": torch.from_numpy(numpy_state[1].astype(np.int64)),
                  "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                  "cached_gaussian": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_file(path):
    """``torch.load`` with ``weights_only=True`` on the CPU, with a clear error."""
    if os.path.isdir(path):
        for name in (BEST, LAST):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise UserError(f"no checkpoint ({BEST} or {LAST}) in folder {path}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as exc:  # noqa: BLE001 - corrupt file, pickled module, ...
        raise UserError(f"cannot load checkpoint {path}: {_load_failure(exc)}") from None


def _load_failure(exc):
    """One line on why ``torch.load(weights_only=True)`` refused a file. torch's own message
    runs to several lines and suggests ``weights_only=False``, which would run whatever code a
    corrupt or untrusted file holds: not advice to pass on."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", text)
    detail = found.group(1).strip() if found else (text.strip().splitlines() or [""])[0]
    global_name = re.search(r"Unsupported global: GLOBAL (\S+)", detail)
    if global_name and global_name.group(1).startswith("numpy"):
        return (f"it holds NumPy objects ({global_name.group(1)}), which a safe load does not "
                f"unpickle; save torch tensors instead (torch.from_numpy)")
    if global_name:
        return (f"it holds a pickled Python object ({global_name.group(1)}), not only tensors; "
                f"save a state_dict (model.state_dict()) instead: checkpoints are loaded with "
                f"weights_only=True, which never runs code from the file")
    first_sentence = re.split(r"(?<=[.!?])\s", detail, maxsplit=1)[0]
    return (f"not a checkpoint torch.load can read safely (a corrupt file or another kind of "
            f"file: {type(exc).__name__}: {first_sentence})")


def is_training_checkpoint(obj):
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def _strip_data_parallel(state_dict):
    # The published script trains under nn.DataParallel, which prefixes every key.
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def model_weights(obj, path):
    """``(state_dict, arch or None, model options)`` from a loaded checkpoint object."""
    if is_training_checkpoint(obj):
        return obj["model"], obj["arch"], obj.get("model_options", {})
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} is neither a sficonv training checkpoint nor a state_dict")
    return _strip_data_parallel(dict(obj)), None, {}


def load_into(model, state_dict, path):
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not fit the model: {exc}") from None


def export_published(model, path, layout="wrapper"):
    """Save ``model`` in a published layout (``wrapper``: ``best.pkl`` keys; ``bare``); the
    file's folder is created if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save(models.to_official_state_dict(model, layout=layout), path)
