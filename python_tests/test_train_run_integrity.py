"""What a run records and a resume trusts: best.pt after a stop between checkpoint writes,
settings a resume may not change, paths that survive another working directory, and runs that
must not start at all."""
import os
import shutil

import pytest
import torch
import yaml

from sficonv_ext.train import checkpoint as ckpt
from sficonv_ext.train.cli import main
from sficonv_ext.train.config import resolve
from sficonv_ext.train.errors import UserError
from sficonv_ext.train.trainer import _check_resumable, resolve_run_config
from test_train_support import FAST, real_fake_folder, write_image

RUN = ["--image-size", "32", "--batch-size", "4", "--val-fraction", "0.34",
       "--save-every-minutes", "0", *FAST[2:]]  # FAST without its batch size


def _weights_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped (as by a kill) between writing epoch 1's last.pt and its best.pt, started
    with a relative --data from its own folder."""
    tmp = tmp_path_factory.mktemp("integrity")
    real_fake_folder(tmp / "data", 6, 6)
    save = ckpt.atomic_save

    def stop_before_best(obj, path):
        if os.path.basename(path) == ckpt.BEST:
            raise KeyboardInterrupt("stopped between last.pt and best.pt")
        save(obj, path)

    before = os.getcwd()
    os.chdir(tmp)
    ckpt.atomic_save = stop_before_best
    try:
        # The command turns the interrupt into one line and exit status 130.
        assert main(["train", "--data", "data", "--out", "run", *RUN]) == 130
    finally:
        ckpt.atomic_save = save
        os.chdir(before)
    return tmp


def own_copy(stopped_run, tmp_path):
    """A copy of the stopped run's folder for a test that resumes it (its data stays where the
    run recorded it): tests then pass in any order, or apart."""
    return shutil.copytree(stopped_run / "run", tmp_path / "run")


def test_resume_rewrites_a_best_pt_the_stop_left_unwritten(stopped_run, tmp_path, capsys):
    run = own_copy(stopped_run, tmp_path)
    assert (run / "last.pt").exists() and not (run / "best.pt").exists()
    last, _ = ckpt.load_file(str(run / "last.pt"))
    assert last["best"]["epoch"] == 1 and last["progress"]["epoch"] == 1
    # The paths a run records are absolute: it resumes from any working directory.
    assert last["config"]["data"] == str(stopped_run / "data")
    with open(run / "config.yaml") as f:
        assert yaml.safe_load(f.read())["data"] == str(stopped_run / "data")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "stopped before writing it" in capsys.readouterr().out
    best, _ = ckpt.load_file(str(run / "best.pt"))
    assert best["best"] == last["best"]
    assert _weights_equal(best["model"], last["model"])


def test_a_resume_may_not_change_the_metric_that_picks_best_pt(stopped_run, capsys):
    code = main(["train", "--resume", str(stopped_run / "run"), "--best-metric", "loss"])
    assert code == 2
    assert "cannot change --best-metric" in capsys.readouterr().err


def test_a_resume_from_another_folder_finds_relative_data_and_may_not_shorten_the_run(
        stopped_run, tmp_path, monkeypatch, capsys):
    run = own_copy(stopped_run, tmp_path)
    monkeypatch.chdir(tmp_path)  # no data/ here: the run's absolute path must be used
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    state, _ = ckpt.load_file(str(run / "last.pt"))
    assert state["progress"]["epoch"] == 2
    # The same folder named relatively from another directory is the same data, not a change.
    monkeypatch.chdir(stopped_run)
    assert main(["train", "--resume", str(run), "--data", "./data", "--epochs", "2",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 2
    assert "has trained 2 epochs, more than --epochs 1" in capsys.readouterr().err
    with open(run / "config.yaml") as f:  # the refused resume wrote nothing
        assert yaml.safe_load(f.read())["epochs"] == 2


def test_a_run_of_an_earlier_hold_out_split_is_not_resumed(stopped_run, tmp_path, capsys):
    # Frames in real/ and fake/ subfolders are now held out by video: a run split before that
    # (its checkpoint records no hold-out version) would train on images it validated on.
    state, _ = ckpt.load_file(str(stopped_run / "run" / "last.pt"))
    assert state["holdout_split"] is not None
    del state["holdout_split"]
    # Its data, flat real/ and fake/ folders, splits as before: no reason to refuse.
    _check_resumable(state, "old_last.pt", dict(state["config"]))
    videos = tmp_path / "videos"
    for label in ("real", "fake"):
        for v in range(3):
            write_image(str(videos / label / f"v{v}" / "0.png"), 32, seed=v)
    state["config"]["data"] = str(videos)
    old = tmp_path / "old_last.pt"
    torch.save(state, old)
    assert main(["train", "--resume", str(old), "--out", str(tmp_path / "resumed")]) == 2
    assert "earlier version of the split" in capsys.readouterr().err


def test_a_run_of_a_flat_ffpp_tree_split_before_version_3_is_not_resumed(stopped_run, tmp_path,
                                                                         capsys):
    # Version 3 groups frames extracted flat into a FaceForensics++ folder by video; a run
    # split under version 2 held out whole folders. A tree of per-video folders splits as it did.
    from test_train_data import _flat_ffpp_tree
    state, _ = ckpt.load_file(str(stopped_run / "run" / "last.pt"))
    state["holdout_split"] = 2
    per_video = tmp_path / "per_video"
    for v in range(2):
        write_image(str(per_video / "original_sequences" / "c23" / f"{v:03d}" / "0.png"), 32)
        write_image(str(per_video / "manipulated_sequences" / "c23" / f"{v:03d}_00{1 - v}"
                        / "0.png"), 32)
    state["config"]["data"] = str(per_video)
    _check_resumable(state, "old_last.pt", dict(state["config"]))
    flat = tmp_path / "flat"
    _flat_ffpp_tree(flat, videos=2, frames=2)
    state["config"]["data"] = str(flat)
    old = tmp_path / "old_last.pt"
    torch.save(state, old)
    assert main(["train", "--resume", str(old), "--out", str(tmp_path / "resumed")]) == 2
    assert "earlier version of the split" in capsys.readouterr().err


def test_progress_is_this_invocations_choice_not_the_runs(stopped_run, tmp_path):
    state, _ = ckpt.load_file(str(stopped_run / "run" / "last.pt"))
    assert "progress" not in state["config"]
    state["config"]["progress"] = True  # as runs saved before it stopped being recorded
    old = tmp_path / "old_last.pt"
    torch.save(state, old)
    given = {"resume": str(old)}
    cfg, _, _ = resolve_run_config(resolve("train", given), given)
    assert cfg["progress"] is False  # standard error is not a terminal under pytest


def test_a_training_set_without_one_class_is_an_error(tmp_path, capsys):
    real_fake_folder(tmp_path / "data", 6, 0)
    (tmp_path / "data" / "fakes").mkdir()  # a misspelt fake/
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                 *RUN]) == 2
    assert "has no fake images (4 real, 0 fake)" in capsys.readouterr().err


def test_a_negative_seed_is_refused_like_any_bad_option(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--data", "builtin", "--out", "x", "--seed", "-1"])
    assert exited.value.code == 2
    assert "must be 0 or more" in capsys.readouterr().err


def test_a_run_stopped_inside_the_last_asked_epoch_is_not_resumed_to_end_there():
    # Stopped after step 1 of epoch 2: resuming with --epochs 1 would run nothing and report a
    # model trained one step into epoch 2 as epoch 1's.
    state = {"progress": {"epoch": 1, "step": 1}}
    cfg = {"epochs": 1, "data": "data", "val_data": "val"}  # no split to check
    with pytest.raises(UserError, match="stopped inside epoch 2 .*give --epochs 2 or more"):
        _check_resumable(state, "last.pt", cfg)
    _check_resumable({"progress": {"epoch": 1, "step": 0}}, "last.pt", cfg)  # epoch 1 done


def test_a_resume_with_more_epochs_takes_the_new_schedules_rate_from_its_first_step(
        stopped_run, tmp_path, monkeypatch):
    # The optimizer's saved rate is the old schedule's: the first resumed step once ran at the
    # finished cosine schedule's 0.
    import shutil

    from sficonv_ext.train import loop, schedules
    run = tmp_path / "run"
    shutil.copytree(stopped_run / "run", run)
    seen = []
    apply = loop.apply_update

    def record(optimizer, scaler, scheduler):
        seen.append((scheduler.last_epoch, optimizer.param_groups[0]["lr"]))
        apply(optimizer, scaler, scheduler)
    monkeypatch.setattr(loop, "apply_update", record)
    # Earlier tests of this module may have resumed the shared run already: start from where
    # its checkpoint stands, two epochs more than it has done.
    before, _ = ckpt.load_file(str(run / "last.pt"))
    done, per_epoch = before["progress"]["epoch"], before["progress"]["steps_per_epoch"]
    epochs = done + 2
    assert main(["train", "--resume", str(run), "--epochs", str(epochs), "--no-progress"]) == 0
    cfg = before["config"]
    factor = schedules.lr_factor(cfg["lr_schedule"], per_epoch, per_epoch * epochs)
    assert seen and seen[0][0] == before["progress"]["global_step"]
    for step, lr in seen:
        assert lr == pytest.approx(cfg["lr"] * factor(step), rel=1e-12), step


def test_a_resume_naming_its_folder_through_a_link_resumes_there(stopped_run, tmp_path):
    # The run's own folder through a link once counted as another folder: refused, and with
    # --overwrite its checkpoints and log were deleted before the resume read them.
    import shutil
    shutil.copytree(stopped_run / "run", tmp_path / "runs" / "S")
    os.symlink(tmp_path / "runs", tmp_path / "link")
    log_before = (tmp_path / "runs" / "S" / "train.log").read_text()
    assert main(["train", "--resume", str(tmp_path / "link" / "S"), "--out",
                 str(tmp_path / "runs" / "S"), "--epochs", "2", "--no-progress"]) == 0
    assert (tmp_path / "runs" / "S" / "train.log").read_text().startswith(log_before)
