"""What a user gets wrong (or does unusually) with the sficonv command: a folder holding their own
files, 16-bit and too-small images, paths that cannot be written, YAML nulls, list-file
encodings, linked folders, errors inside DataLoader workers, resuming into a new folder."""
import csv
import re
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from sficonv_ext.models import MIN_INPUT_SIZE
from sficonv_ext.train import checkpoint as ckpt
from sficonv_ext.train.cli import _one_line, _os_error_line, main
from sficonv_ext.train.data import images_under, read_list_file
from sficonv_ext.train.errors import DataError
from sficonv_ext.train.images import UnreadableImageError, open_rgb
from test_train_support import FAST, tiny_builtin, write_image


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "run"
    assert main(["train", *tiny_builtin(tmp), *FAST, "--out", str(out)]) == 0
    yield tmp, out
    shutil.rmtree(tmp, ignore_errors=True)


def test_a_folder_with_the_users_own_files_is_refused_not_emptied(run_dir, tmp_path, capsys):
    tmp, _ = run_dir
    folder = tmp_path / "project"
    (folder / "tensorboard" / "old").mkdir(parents=True)
    (folder / "tensorboard" / "old" / "events.out").write_text("keep me")
    (folder / "config.yaml").write_text("lr: 0.1\n")
    code = main(["train", *tiny_builtin(tmp), *FAST, "--out", str(folder)])
    assert code == 2
    assert "already holds config.yaml, tensorboard" in capsys.readouterr().err
    assert (folder / "tensorboard" / "old" / "events.out").read_text() == "keep me"
    assert (folder / "config.yaml").read_text() == "lr: 0.1\n"


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)  # 0 .. 63960
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(open_rgb(str(tmp_path / "g16.png"))).astype(np.int64)
    expected = np.rint(ramp / 257.0).astype(np.int64)
    assert np.abs(rgb[..., 0] - expected).max() <= 1
    assert (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb.mean() == pytest.approx(expected.mean(), abs=1)


def test_too_small_images_are_skipped_in_predict_and_refused_as_image_size(run_dir, tmp_path,
                                                                            capsys):
    tmp, out = run_dir
    write_image(str(tmp_path / "imgs" / "ok.png"), 40, seed=1)
    write_image(str(tmp_path / "imgs" / "tiny.png"), 16, seed=2)
    scores = tmp_path / "scores.csv"
    assert main(["predict", "--checkpoint", str(out), str(tmp_path / "imgs"), "--out",
                 str(scores), "--workers", "0", "--no-progress"]) == 0
    with open(scores) as f:
        rows = list(csv.DictReader(f))
    assert [os.path.basename(r["path"]) for r in rows] == ["ok.png"]
    # Full precision, and the margin whose sigmoid the score is.
    margin = float(rows[0]["margin"])
    assert float(rows[0]["score"]) == pytest.approx(1 / (1 + math.exp(-margin)), rel=1e-12)
    assert "tiny.png" in capsys.readouterr().out
    # Nothing scorable: an error (status 2), not an empty CSV.
    assert main(["predict", "--checkpoint", str(out), str(tmp_path / "imgs" / "tiny.png"),
                 "--out", str(tmp_path / "none.csv"), "--workers", "0", "--no-progress"]) == 2
    assert not (tmp_path / "none.csv").exists()
    assert "could be scored" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # argparse: usage and the message, status 2
        main(["train", *tiny_builtin(tmp)[:4], *FAST, "--image-size", "16",
              "--out", str(tmp_path / "r")])
    assert refused.value.code == 2
    assert f"must be at least {MIN_INPUT_SIZE}" in capsys.readouterr().err


def test_an_error_in_a_loader_worker_is_one_line(run_dir, tmp_path, capsys):
    _, out = run_dir
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    code = main(["predict", "--checkpoint", str(out), str(corrupt), "--image-size", "32",
                 "--strict", "--workers", "1", "--no-progress", "--out",
                 str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: cannot read image {corrupt}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_one_line_keeps_plain_messages_and_unwraps_worker_ones():
    assert _one_line(DataError("plain message")) == "plain message"
    wrapped = UnreadableImageError(
        "Caught UnreadableImageError in DataLoader worker process 0.\nOriginal Traceback "
        "(most recent call last):\n  File \"x.py\", line 1, in f\n    raise\n"
        "sficonv_ext.train.images.UnreadableImageError: cannot read image /a b.png\n")
    assert _one_line(wrapped) == "cannot read image /a b.png"


@pytest.mark.parametrize("target", ["folder", "missing_parent"])
def test_an_output_path_that_cannot_be_written_is_one_line(run_dir, tmp_path, capsys, target):
    _, out = run_dir
    write_image(str(tmp_path / "imgs" / "ok.png"), 40, seed=1)
    path = tmp_path / "imgs" if target == "folder" else tmp_path / "ok.png" / "x" / "s.csv"
    if target == "missing_parent":
        (tmp_path / "ok.png").write_text("a file, not a folder")
    code = main(["predict", "--checkpoint", str(out), str(tmp_path / "imgs"), "--out",
                 str(path), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sficonv predict: error: ")
    assert "Traceback" not in err
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no stray temporary file


def test_an_empty_config_path_is_refused_not_ignored(capsys):
    assert main(["train", "--data", "builtin", "--config", ""]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_yaml_null_only_where_an_option_may_be_unset(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: null\n")
    assert main(["train", "--data", "builtin", "--config", str(config)]) == 2
    assert "epochs cannot be null" in capsys.readouterr().err
    config.write_text("epochs: 1.9\n")
    assert main(["train", "--data", "builtin", "--config", str(config)]) == 2
    assert "bad value 1.9 for epochs" in capsys.readouterr().err


def test_list_files_with_a_bom_or_in_another_encoding(tmp_path):
    write_image(str(tmp_path / "r0.png"), 32)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffr0.png 0\n".encode("utf-8"))
    assert [s.path for s in read_list_file(str(bom))] == [str(tmp_path / "r0.png")]
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("r0.png 0\n".encode("utf-16"))
    with pytest.raises(DataError, match="not a UTF-8 text list"):
        read_list_file(str(utf16))


def test_a_link_back_up_the_tree_lists_each_image_once(tmp_path):
    write_image(str(tmp_path / "real" / "r0.png"), 32)
    write_image(str(tmp_path / "real" / "sub" / "r1.png"), 32)
    os.symlink(tmp_path / "real", tmp_path / "real" / "sub" / "again")
    found = images_under(str(tmp_path / "real"))
    assert sorted(os.path.basename(p) for p in found) == ["r0.png", "r1.png"]


def test_resuming_into_another_folder_keeps_the_best_checkpoint(run_dir, tmp_path, capsys):
    tmp, out = run_dir
    new = tmp_path / "continued"
    code = main(["train", "--resume", str(out), "--out", str(new), "--workers", "0",
                 "--no-progress", "--export-published", "wrapper"])
    assert code == 0, capsys.readouterr().err
    assert (new / ckpt.BEST).is_file() and (new / "history.csv").is_file()
    assert (new / "best_published.pkl").is_file()
    best, _ = ckpt.load_file(str(new / ckpt.BEST))
    source, _ = ckpt.load_file(str(out / ckpt.BEST))
    assert best["best"] == source["best"]
    # With no epoch left to train, the new folder still holds the last.pt that --resume takes.
    last, _ = ckpt.load_file(str(new / ckpt.LAST))
    assert last["progress"] == ckpt.load_file(str(out / ckpt.LAST))[0]["progress"]
    code = main(["train", "--resume", str(new), "--workers", "0", "--no-progress"])
    assert code == 0, capsys.readouterr().err


def test_predict_to_standard_output_keeps_the_log_out_of_the_csv(run_dir, tmp_path, capsys):
    _, out = run_dir
    image = write_image(str(tmp_path / "a.png"), 40, seed=3)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out), image, "--out", "-", "--workers", "0",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(captured.out.splitlines()))
    assert [r["path"] for r in rows] == [image] and 0.0 <= float(rows[0]["score"]) <= 1.0
    assert "loaded" in captured.err and "standard output" in captured.err
    assert not (tmp_path / "-").exists() and not os.path.exists("-")


def test_predict_into_a_link_to_a_non_regular_file_writes_through_it(run_dir, tmp_path):
    _, out = run_dir
    image = write_image(str(tmp_path / "a.png"), 40, seed=3)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "scores.csv"
    os.symlink(fifo, link)
    import threading
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    assert main(["predict", "--checkpoint", str(out), image, "--out", str(link), "--workers",
                 "0", "--no-progress"]) == 0
    reader.join(timeout=60)
    assert received and received[0].startswith("path,score,margin\n")
    assert os.path.islink(link)  # the link itself was not replaced by a regular file


def test_eval_does_not_write_over_a_training_run(run_dir, capsys):
    tmp, out = run_dir
    before = (out / "metrics.json").read_text()
    code = main(["eval", "--checkpoint", str(out), *tiny_builtin(tmp)[:6], "--out", str(out),
                 "--workers", "0", "--no-progress"])
    assert code == 2 and "holds a training run" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before


def test_export_makes_its_folder_and_train_log_records_a_fatal_error(run_dir, tmp_path, capsys):
    tmp, out = run_dir
    target = tmp_path / "new" / "folder" / "best.pkl"
    assert main(["export", "--checkpoint", str(out / ckpt.BEST), "--out", str(target)]) == 0
    assert target.is_file()
    listing = tmp_path / "bad.txt"
    listing.write_text("x.png 7\n")
    run = tmp_path / "failed"
    assert main(["train", "--data", str(listing), *FAST, "--out", str(run)]) == 2
    assert "label must be 0 (real) or 1 (fake)" in (run / "train.log").read_text()
    assert capsys.readouterr().out.count("label must be") == 0  # printed once, on stderr


def test_export_converts_a_deeper_published_file_with_arch(tmp_path, capsys):
    import torch
    from sficonv_ext import reference
    wrapper = reference.PublishedTrainingWrapper(50)
    torch.save(wrapper.state_dict(), tmp_path / "best.pkl")
    bare = tmp_path / "bare.pkl"
    assert main(["export", "--checkpoint", str(tmp_path / "best.pkl"), "--out", str(bare),
                 "--layout", "bare", "--arch", "sfi_resnet50"]) == 0
    network = reference.SFIConvResNet(reference.DEPTHS[50])
    network.load_state_dict(torch.load(bare, weights_only=True), strict=True)
    # The same weights: both files load into fast models with equal state_dicts.
    from sficonv_ext import models
    from_bare, from_wrapper = models.sfi_resnet50(), models.sfi_resnet50()
    from_bare.load_state_dict(torch.load(bare, weights_only=True))
    from_wrapper.load_state_dict(wrapper.state_dict())
    for (name, a), (_, b) in zip(from_bare.state_dict().items(),
                                 from_wrapper.state_dict().items()):
        if not name.startswith("fc."):  # the bare network has no classifier
            assert torch.equal(a, b), name
    assert main(["export", "--checkpoint", str(tmp_path / "best.pkl"), "--out",
                 str(tmp_path / "x.pkl")]) == 2
    assert "SFIConv-ResNet-50" in capsys.readouterr().err


def test_progress_bars_default_to_whether_stderr_is_a_terminal(monkeypatch):
    from sficonv_ext.train.config import resolve
    for tty in (False, True):
        monkeypatch.setattr("sys.stderr.isatty", lambda tty=tty: tty)
        assert resolve("eval", {"data": "x"})["progress"] is tty
        assert resolve("eval", {"data": "x", "progress": True})["progress"] is True


def test_a_file_name_that_is_not_utf8_is_scored_and_written_back(run_dir, tmp_path):
    # Such names reach Python as surrogate escapes; the strict UTF-8 writers raised a
    # traceback after scoring. They are written back as the original bytes.
    tmp, out = run_dir
    name = os.fsdecode(b"caf\xe9.png")
    write_image(os.path.join(str(tmp_path / "imgs"), name), 40, seed=1)
    scores = tmp_path / "scores.csv"
    assert main(["predict", "--checkpoint", str(out), str(tmp_path / "imgs"), "--out",
                 str(scores), "--workers", "0", "--no-progress"]) == 0
    assert b"caf\xe9.png," in scores.read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--lr", "inf"], "positive and finite"),
    (["--weight-decay", "inf"], "0 or more and finite"),
    (["--seed", str(2**64)], "below 2\\*\\*63"),
    (["--image-size", "99999999"], "at most 8192"),
])
def test_values_that_would_fail_later_are_refused_up_front(tmp_path, capsys, args, message):
    # Each once passed validation: inf trained NaN (reported as a diverged model), the seed
    # overflowed in torch.manual_seed, the size in PIL, with a traceback.
    with pytest.raises(SystemExit) as stopped:  # argparse's one-line error, exit 2
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *args])
    assert stopped.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_config_file_loose_ends(tmp_path, capsys):
    from sficonv_ext.train.config import read_yaml
    from sficonv_ext.train.errors import UserError
    cases = {"twice.yaml": ("image_size: 32\nimage-size: 64\n", "given twice"),
             "list.yaml": ("data: [a, b]\n", "takes one value, not a list"),
             "latin1.yaml": ("data: caf\xe9\n".encode("latin-1"), "not UTF-8")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        with pytest.raises(UserError, match=message):
            read_yaml(str(path), "train")
    (tmp_path / "null_arch.yaml").write_text("arch: null\n")
    assert read_yaml(str(tmp_path / "null_arch.yaml"), "train") == {}  # train's default arch


def test_tilde_and_empty_paths(tmp_path, monkeypatch):
    from sficonv_ext.train.config import absolute_path_option, resolve
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = resolve("train", {"out": "~/o", "resume": "~/r", "data": "~/d"})
    assert (cfg["out"], cfg["resume"]) == (str(tmp_path / "o"), str(tmp_path / "r"))
    assert resolve("predict", {"out": "-"})["out"] == "-"
    assert absolute_path_option("data", "") == ""  # "needs --data", not the current folder


def test_an_out_folder_inside_the_data_is_refused(tmp_path, capsys):
    # Its roc.png would be read back as an image of the data set (a fake one under fake/).
    from test_train_support import real_fake_folder
    real_fake_folder(tmp_path / "data", 6, 6)
    code = main(["train", "--data", str(tmp_path / "data"), *FAST, "--image-size", "32",
                 "--out", str(tmp_path / "data" / "fake" / "run")])
    assert code == 2 and "inside the data folder" in capsys.readouterr().err
    assert not (tmp_path / "data" / "fake" / "run").exists()


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    from sficonv_ext.train import trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "train", interrupted)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path), "--out", str(run)]) == 130
    # No checkpoint yet: no resume hint that --resume would then refuse.
    assert capsys.readouterr().err.strip() == (
        "sficonv train: interrupted; no checkpoint was written yet (start the run again)")
    run.mkdir()
    (run / "last.pt").write_bytes(b"")
    assert main(["train", "--data", str(tmp_path), "--out", str(run)]) == 130
    assert capsys.readouterr().err.strip() == (
        f"sficonv train: interrupted; resume from its last checkpoint with --resume {run}")
    # Resuming into another folder that has no checkpoint yet: the one resumed from is there.
    assert main(["train", "--resume", str(run), "--out", str(tmp_path / "other")]) == 130
    assert capsys.readouterr().err.strip() == (
        f"sficonv train: interrupted; resume again with --resume {run}")


def test_export_to_standard_output_or_a_folder_is_refused(run_dir, tmp_path, capsys):
    for out in ("-", str(tmp_path)):
        assert main(["export", "--checkpoint", str(run_dir[1]), "--out", out]) == 2
        assert "must be a file name" in capsys.readouterr().err
    assert not os.path.exists("-")


def test_a_failed_eval_says_why_in_its_log(run_dir, tmp_path):
    out = tmp_path / "eval"
    code = main(["eval", "--checkpoint", str(run_dir[1]), "--data", str(tmp_path / "nothing"),
                 "--out", str(out), "--workers", "0", "--no-progress"])
    assert code == 2
    assert "error: data" in (out / "eval.log").read_text()


def test_device_names_are_checked_before_use(monkeypatch):
    # A malformed cuda:x was a traceback, and cuda:N under torchrun put every process on GPU N.
    import torch

    from sficonv_ext.train.distributed import resolve_device
    from sficonv_ext.train.errors import UserError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, world, message in [("cuda:x", 1, "cpu, cuda or cuda:N"),
                                 ("cudax", 1, "cpu, cuda or cuda:N"),
                                 ("cuda:1", 2, "names one GPU, but 2 processes"),
                                 ("cuda:5", 1, "has 2 CUDA device")]:
        with pytest.raises(UserError, match=message):
            resolve_device(name, 1, world)
    assert resolve_device("cuda", 1, 2) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", 1, 1) == torch.device("cuda", 0)


def test_an_unloadable_checkpoint_is_one_line_without_torch_advice(tmp_path, capsys):
    import torch
    from sficonv_ext import models
    (tmp_path / "img.png").write_bytes(b"")  # an input path; the checkpoint fails first
    corrupt = tmp_path / "random.pt"
    corrupt.write_bytes(np.random.default_rng(0).bytes(1000))
    whole = tmp_path / "whole_model.pt"
    torch.save(models.sfi_resnet26(), whole)
    for path, expected in ((corrupt, "a corrupt file or another kind of file"),
                           (whole, "it holds a pickled Python object "
                                   "(sficonv_ext.models.resnet.SFIResNet), not only tensors")):
        code = main(["predict", "--checkpoint", str(path), str(tmp_path / "img.png"),
                     "--out", str(tmp_path / "p.csv")])
        err = capsys.readouterr().err
        assert code == 2 and expected in err, err
        # One line, and not torch's suggestion to load with weights_only=False (which runs
        # whatever code the file holds).
        assert err.count("\n") == 1 and "weights_only` set to `False" not in err
        assert "\x1b[" not in err


def test_an_own_layout_checkpoint_of_another_depth_names_it(tmp_path, capsys):
    import torch
    from sficonv_ext import models
    path = tmp_path / "own50.pt"
    torch.save(models.sfi_resnet50().state_dict(), path)
    (tmp_path / "img.png").write_bytes(b"")
    code = main(["predict", "--checkpoint", str(path), str(tmp_path / "img.png"),
                 "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "(144 in all)" in err and "--arch sfi_resnet50" in err


def test_file_system_errors_name_the_users_path(run_dir, tmp_path, capsys):
    tmp, run = run_dir
    in_the_way = tmp_path / "scores.csv"
    in_the_way.write_text("")
    code = main(["export", "--checkpoint", str(run), "--out", str(in_the_way / "e.pkl")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"sficonv export: error: cannot make the folder {in_the_way}: a file of that name is "
        f"in the way")
    # A temporary file written beside the output is named as the output itself.
    for temporary in ("p.csv.tmp-4242", ".p.csv.tmp-4242"):
        error = PermissionError(13, "Permission denied", str(tmp_path / temporary))
        assert _os_error_line(error) == f"{tmp_path / 'p.csv'}: Permission denied"
    error = NotADirectoryError(20, "Not a directory", str(in_the_way / "x" / "p.csv"))
    assert "a part of that path is a file, not a folder" in _os_error_line(error)


def test_predict_scores_an_image_reached_twice_once(run_dir, tmp_path, capsys):
    _, out = run_dir
    folder = tmp_path / "imgs"
    folder.mkdir()
    first = write_image(str(folder / "a.png"), 40, seed=3)
    write_image(str(folder / "b.png"), 40, seed=4)
    os.symlink(folder, tmp_path / "link")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out), str(folder), first,
                 str(tmp_path / "link"), "--out", "-", "--workers", "0", "--no-progress"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(captured.out.splitlines()))
    assert sorted(r["path"] for r in rows) == sorted([first, str(folder / "b.png")])
    assert "3 image(s) reached more than once are scored once" in captured.err


def test_val_fraction_with_the_builtin_set_is_ignored_aloud(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_builtin(tmp_path), *FAST, "--val-fraction", "0.5",
                 "--out", str(out)]) == 0
    assert ("warning: --val-fraction does not apply to --data builtin (its validation split "
            "is fixed); ignored") in capsys.readouterr().err
    assert "val_fraction: 0.5" not in (out / "config.yaml").read_text()
