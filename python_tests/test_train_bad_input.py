"""Bad input loses nothing: missing and corrupt images, bad list lines, empty and one-class
data, a non-finite loss, an occupied output folder (see test_train_e2e)."""
import csv
import json
import math

import pytest
import torch

from sficonv_ext.train import checkpoint as ckpt
from sficonv_ext.train import loop
from sficonv_ext.train.cli import main
from test_train_support import FAST, real_fake_folder, write_image


def _list(tmp_path, name, entries):
    path = tmp_path / name
    path.write_text("".join(f"{p} {y}\n" for p, y in entries))
    return str(path)


@pytest.fixture
def data(tmp_path):
    """A training list and a validation list, each with one missing and one corrupt image."""
    real_fake_folder(tmp_path / "d", 8, 8)
    corrupt = tmp_path / "d" / "fake" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    truncated = tmp_path / "d" / "real" / "truncated.png"
    write_image(str(truncated), 32, seed=99)
    truncated.write_bytes(truncated.read_bytes()[:200])
    good = [(f"d/real/r{i}.png", 0) for i in range(8)] + [(f"d/fake/f{i}.png", 1)
                                                          for i in range(8)]
    train = _list(tmp_path, "train.txt", good[2:8] + good[10:] + [("d/fake/corrupt.png", 1),
                                                                 ("d/real/gone.png", 0)])
    val = _list(tmp_path, "val.txt", good[:2] + good[8:10] + [("d/real/truncated.png", 0),
                                                              ("d/fake/missing.png", 1)])
    return tmp_path, train, val


def test_unreadable_and_missing_images_are_skipped_and_counted(data, capsys):
    tmp_path, train, val = data
    out = tmp_path / "run"
    # One batch of all 13 readable-or-corrupt training images, so the corrupt one is loaded.
    code = main(["train", "--data", train, "--val-data", val, "--image-size", "32", *FAST,
                 "--batch-size", "13", "--out", str(out)])
    assert code == 0
    log = capsys.readouterr().out
    assert "skipped 1 missing image(s)" in log and "gone.png" in log and "missing.png" in log
    assert "corrupt.png" in log and "truncated.png" in log
    metrics = json.loads((out / "metrics.json").read_text())
    # The truncated validation image and the missing one, as eval counts them below (the
    # missing one was once left out of the training run's count).
    assert metrics["n"] == 4 and metrics["skipped"] == 2
    assert "corrupt.png" in (out / "train.log").read_text()

    code = main(["eval", "--checkpoint", str(out / "last.pt"), "--data", val, "--out",
                 str(tmp_path / "eval"), "--workers", "0", "--no-progress"])
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["skipped"] == 2  # truncated + missing


@pytest.mark.parametrize("bad", ["d/fake/corrupt.png", "d/real/gone.png"])
def test_strict_stops_naming_the_file(data, capsys, bad):
    tmp_path, _, _ = data
    good = [(f"d/real/r{i}.png", 0) for i in range(6)] + [(f"d/fake/f{i}.png", 1)
                                                          for i in range(6)]
    train = _list(tmp_path, "strict_train.txt", good + [(bad, int("fake" in bad))])
    val = _list(tmp_path, "strict_val.txt", [("d/real/r7.png", 0), ("d/fake/f7.png", 1)])
    code = main(["train", "--data", train, "--val-data", val, "--image-size", "32", *FAST,
                 "--batch-size", "13", "--out", str(tmp_path / "strict"), "--strict"])
    assert code == 2
    assert bad.split("/")[-1] in capsys.readouterr().err


def test_bad_label_names_file_and_line(tmp_path, capsys):
    real_fake_folder(tmp_path / "d", 2, 2)
    listing = tmp_path / "list.txt"
    listing.write_text("d/real/r0.png 0\nd/fake/f0.png 1\nd/fake/f1.png 3\n")
    code = main(["train", "--data", str(listing), *FAST, "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{listing}, line 3: label must be 0 (real) or 1 (fake), got '3'" in err
    # The failed start left no run behind: the same folder takes the corrected run.
    listing.write_text("d/real/r0.png 0\nd/real/r1.png 0\nd/fake/f0.png 1\nd/fake/f1.png 1\n")
    code = main(["train", "--data", str(listing), "--image-size", "32", *FAST,
                 "--batch-size", "2", "--val-fraction", "0.3", "--out", str(tmp_path / "run")])
    assert code == 0


def test_empty_training_set_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = main(["train", "--data", str(empty), *FAST, "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"the training set from {empty} is empty" in err


def test_empty_eval_set_writes_null_metrics_and_fails(tmp_path, capsys):
    real_fake_folder(tmp_path / "d", 4, 4)
    assert main(["train", "--data", str(tmp_path / "d"), "--image-size", "32", *FAST,
                 "--out", str(tmp_path / "run"), "--val-fraction", "0.25"]) == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(empty), "--out",
                 str(tmp_path / "eval"), "--no-progress", "--workers", "0"])
    assert code == 2  # as predict: scoring nothing is not a success
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 0 and metrics["auc"] is None
    out, err = capsys.readouterr()
    assert "no images to evaluate" in out
    assert f"no image of {empty} could be scored (0 skipped); metrics.json holds n = 0" in err


def test_one_class_validation_goes_on(tmp_path, capsys):
    real_fake_folder(tmp_path / "d", 8, 8)
    val = _list(tmp_path, "val.txt", [(f"d/real/r{i}.png", 0) for i in range(3)])
    out = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path / "d"), "--val-data", val, "--image-size",
                 "32", *FAST, "--epochs", "2", "--out", str(out)])
    assert code == 0
    assert "only one class present" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auc"] is None and metrics["eer"] is None and metrics["acc"] is not None
    assert metrics["n"] == 3
    assert (out / "best.pt").is_file()  # chosen by accuracy, which is defined
    assert not (out / "roc.png").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real_fake_folder(tmp_path / "d", 8, 8)
    real_loss = loop.classification_loss
    calls = [0]

    def loss_turning_nan(logits, labels):
        calls[0] += 1
        value = real_loss(logits, labels)
        return value * math.nan if calls[0] == 4 else value

    monkeypatch.setattr(loop, "classification_loss", loss_turning_nan)
    out = tmp_path / "run"
    # 14 training images, batch 4: 3 steps per epoch; step 4 is the first of epoch 2.
    code = main(["train", "--data", str(tmp_path / "d"), "--image-size", "32",
                 "--batch-size", "4", "--epochs", "2", "--workers", "0", "--no-progress",
                 "--val-fraction", "0.1", "--out", str(out)])
    assert code == 3
    err = capsys.readouterr().err
    assert "non-finite training loss" in err and "epoch 2, step 1 (global step 4)" in err
    state, _ = ckpt.load_file(str(out / "last.pt"))
    assert state["progress"]["global_step"] == 3 and state["progress"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values()
               if v.is_floating_point())
    assert not (out / "metrics.json").exists()


def test_a_run_of_unreadable_training_images_is_counted_once_each(tmp_path, capsys):
    # Four unreadable images in a row: each also fails while standing in for the one before
    # it; history.csv and the log once counted every failed stand-in (10 here).
    real_fake_folder(tmp_path / "d", 8, 8)
    good = [(f"d/real/r{i}.png", 0) for i in range(8)] + [(f"d/fake/f{i}.png", 1)
                                                          for i in range(8)]
    bad = []
    for i in range(4):
        (tmp_path / "d" / "fake" / f"bad{i}.png").write_bytes(b"not an image")
        bad.append((f"d/fake/bad{i}.png", 1))
    train = _list(tmp_path, "train.txt", good[:6] + bad + good[6:12])
    val = _list(tmp_path, "val.txt", good[12:])
    out = tmp_path / "run"
    assert main(["train", "--data", train, "--val-data", val, "--image-size", "32", *FAST,
                 "--batch-size", "16", "--out", str(out)]) == 0
    with open(out / "history.csv") as f:
        assert [row["skipped"] for row in csv.DictReader(f)] == ["4"]
    assert "skipped 4 unreadable or too small image(s) in epoch 1" in capsys.readouterr().out
