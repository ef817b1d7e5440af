"""Helpers for the training-harness tests (imported by the test_train_* modules)."""
import os
import signal
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image(path, size=32, seed=0, fake=False):
    """A small textured RGB image; fakes get a blurred square patch (something to learn)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(size, size, 3)).astype(np.float64)
    if fake:
        lo, hi = size // 4, 3 * size // 4
        patch = base[lo:hi, lo:hi]
        base[lo:hi, lo:hi] = (patch + np.roll(patch, 1, 0) + np.roll(patch, 1, 1)) / 3
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(base.astype(np.uint8)).save(path)
    return path


def real_fake_folder(root, n_real=6, n_fake=6, size=32):
    for i in range(n_real):
        write_image(os.path.join(root, "real", f"r{i}.png"), size, seed=i)
    for i in range(n_fake):
        write_image(os.path.join(root, "fake", f"f{i}.png"), size, seed=100 + i, fake=True)
    return str(root)


def tiny_builtin(tmp_path, images=24, size=32):
    """Options for a small built-in data set cached under ``tmp_path``."""
    return ["--data", "builtin", "--builtin-images", str(images), "--image-size", str(size),
            "--cache-dir", str(tmp_path / "cache")]


FAST = ["--batch-size", "8", "--epochs", "1", "--workers", "0", "--no-progress"]


def run_module(args, env=None, timeout=300, launcher=None):
    """Run ``python -m sficonv_ext.train ARGS`` (or under ``launcher``); return the result."""
    # A fixed thread count: bit-exact comparisons between processes need the same reductions.
    full_env = dict(os.environ, OMP_NUM_THREADS="2")
    full_env.update(env or {})
    command = (launcher or [sys.executable, "-m"]) + ["sficonv_ext.train"] + list(args)
    return run_group(command, full_env, timeout)


def run_group(command, env, timeout):
    """Run ``command`` in its own process group; on timeout kill the whole group (torchrun's
    workers included) before failing."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(command)}\n{stdout}\n"
                             f"{stderr}") from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
