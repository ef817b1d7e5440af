"""A run killed with SIGKILL (mid-epoch, or in the middle of writing a checkpoint) and resumed
ends exactly where an uninterrupted run ends, in deterministic mode."""
import csv
import json
import os
import shutil
import sys

import pytest
import torch

from sficonv_ext.train import checkpoint as ckpt
from test_train_support import run_group, run_module, tiny_builtin

# Runs the command in a process that kills itself with SIGKILL at a chosen point.
KILLER = """
import os, signal, sys
import torch
from sficonv_ext.train import loop
from sficonv_ext.train.cli import main

kill_step = int(os.environ.get("KILL_AT_STEP", "0"))
kill_save = int(os.environ.get("KILL_IN_SAVE", "0"))
steps, saves = [0], [0]
apply_update, save = loop.apply_update, torch.save

def update_then_maybe_die(*args, **kwargs):
    apply_update(*args, **kwargs)
    steps[0] += 1
    if steps[0] == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)

def torn_save(obj, f, *args, **kwargs):
    saves[0] += 1
    if saves[0] == kill_save:  # half a file, then death before the rename
        f.write(b"PK torn checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)

loop.apply_update = update_then_maybe_die
torch.save = torn_save
sys.exit(main(sys.argv[1:]))
"""

DETERMINISTIC_COLUMNS = ("epoch", "lr", "train_loss", "train_images", "skipped", "val_acc",
                         "val_auc", "val_loss")


def _args(tmp_path, out):
    # 19 training images, batch 4: 4 steps per epoch, 2 epochs, last.pt every 2 steps.
    return ["train", *tiny_builtin(tmp_path), "--batch-size", "4", "--epochs", "2",
            "--workers", "0", "--no-progress", "--deterministic", "--augment", "published",
            "--save-every-steps", "2", "--out", str(out)]


def _run_script(script, args, env):
    full = dict(os.environ, OMP_NUM_THREADS="2", **env)
    return run_group([sys.executable, str(script), *args], full, timeout=300)


def _outcome(out):
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    with open(out / "history.csv") as f:
        history = [{k: r[k] for k in DETERMINISTIC_COLUMNS} for r in csv.DictReader(f)]
    state, _ = ckpt.load_file(str(out / "last.pt"))
    return metrics, history, state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    result = run_module(_args(tmp, tmp / "run"))
    assert result.returncode == 0, result.stderr
    yield tmp, _outcome(tmp / "run")
    shutil.rmtree(tmp, ignore_errors=True)  # ~300 MB of checkpoints: free the disk for the rest


def _assert_same(outcome, baseline):
    metrics, history, state = outcome
    base_metrics, base_history, base_state = baseline
    assert metrics == base_metrics
    assert history == base_history
    assert state["progress"] == base_state["progress"]
    for key, value in base_state["model"].items():
        assert torch.equal(state["model"][key], value), key


def test_sigkill_mid_epoch_then_resume_matches(uninterrupted, tmp_path):
    base_tmp, baseline = uninterrupted
    out = tmp_path / "run"
    os.symlink(base_tmp / "cache", tmp_path / "cache")
    killed = _run_script(_write_killer(tmp_path), _args(tmp_path, out), {"KILL_AT_STEP": "7"})
    assert killed.returncode == -9, killed.stderr
    assert not (out / "metrics.json").exists()
    state, _ = ckpt.load_file(str(out / "last.pt"))
    # Killed after step 3 of epoch 2; the last save was after step 2 of that epoch.
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] == 2
    assert state["progress"]["global_step"] == 6
    resumed = run_module(["train", "--resume", str(out), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "step 2" in resumed.stdout
    _assert_same(_outcome(out), baseline)


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(uninterrupted, tmp_path):
    base_tmp, baseline = uninterrupted
    out = tmp_path / "run"
    os.symlink(base_tmp / "cache", tmp_path / "cache")
    # Saves: step 2, end of epoch 1 (last, best), step 6, ...: die inside the fourth.
    killed = _run_script(_write_killer(tmp_path), _args(tmp_path, out), {"KILL_IN_SAVE": "4"})
    assert killed.returncode == -9, killed.stderr
    leftovers = [n for n in os.listdir(out) if ".tmp-" in n]
    assert leftovers, "the torn write should have left its temporary file"
    state, _ = ckpt.load_file(str(out / "last.pt"))
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] == 0
    resumed = run_module(["train", "--resume", str(out), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    _assert_same(_outcome(out), baseline)


def _write_killer(tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    return script


@pytest.mark.parametrize("failure", [
    OSError(28, "No space left on device"),
    # What torch's zip writer raised on the CI machine whose disk filled up.
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 25460544 vs "
                 "25460440"),
])
def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                         failure):
    path = tmp_path / "last.pt"
    ckpt.atomic_save({"step": 1}, str(path))

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK partial")
        raise failure

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ckpt.UserError, match=r"could not write .*last\.pt: .*MiB free"):
        ckpt.atomic_save({"step": 2}, str(path))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_an_error_that_is_not_about_writing_is_not_reported_as_one(tmp_path, monkeypatch):
    def broken(obj, f, *args, **kwargs):
        raise RuntimeError("Cannot access storage of OpaqueTensorImpl")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="OpaqueTensorImpl") as caught:
        ckpt.atomic_save({"step": 2}, str(tmp_path / "last.pt"))
    assert not isinstance(caught.value, ckpt.UserError)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_the_unfused_adam_resumes_with_fp16_scaling():
    # Checkpoints written before the trainer's Adam was fused hold "fused": None in their groups.
    # Loaded as saved, they turned this run's fused Adam back into the unfused one, which
    # GradScaler (fp16 AMP) then called with the fused step's arguments: the first step failed.
    import types
    from sficonv_ext.train.trainer import Run
    old = torch.nn.Parameter(torch.randn(10))
    old.grad = torch.randn(10)
    before = torch.optim.Adam([old], lr=1e-3)
    before.step()
    param = torch.nn.Parameter(old.detach().clone())
    now = torch.optim.Adam([param], lr=1e-3, fused=True)
    now.load_state_dict(Run._with_this_adam(types.SimpleNamespace(optimizer=now),
                                            before.state_dict()))
    assert now.param_groups[0]["fused"] and now.state[param]["step"].dtype == torch.float32
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((param * 2).sum()).backward()
    scaler.step(now)
    assert torch.equal(now.state[param]["step"], torch.tensor(2.0))
