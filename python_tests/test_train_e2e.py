"""End to end on the CPU with tiny images and the real SFIConv-ResNet-26: train, eval, predict,
a published best.pkl, DistributedDataParallel with two gloo processes, export."""
import csv
import json
import os
import shutil
import sys

import pytest
import torch

from sficonv_ext import models, reference
from sficonv_ext.train import builtin_data
from sficonv_ext.train import checkpoint as ckpt
from sficonv_ext.train.cli import main
from sficonv_ext.train.transforms import to_normalized_tensor
from sficonv_ext.train.images import open_rgb
from test_train_support import FAST, real_fake_folder, run_module, tiny_builtin, write_image

METRIC_KEYS = {"acc", "auc", "ap", "eer", "tpr_at_fpr", "n"}


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run on the built-in data set, shared by the eval/predict tests."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "run"
    code = main(["train", *tiny_builtin(tmp), *FAST, "--epochs", "2", "--out", str(out),
                 "--export-published", "wrapper"])
    assert code == 0
    yield tmp, out
    shutil.rmtree(tmp, ignore_errors=True)  # ~300 MB of checkpoints: free the disk for the rest


def test_train_writes_a_complete_run(trained):
    tmp, out = trained
    for name in ("last.pt", "best.pt", "metrics.json", "history.csv", "roc.png", "train.log",
                 "config.yaml", "best_published.pkl"):
        assert (out / name).is_file(), name
    metrics = read_json(out / "metrics.json")
    assert METRIC_KEYS <= set(metrics)
    assert set(metrics["tpr_at_fpr"]) == {"1e-2", "1e-3", "1e-4"}
    assert metrics["n"] == 5  # 20% of 24 built-in images are held out
    assert metrics["best"]["metric"] == "acc"
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # cosine decay
    last, _ = ckpt.load_file(str(out / "last.pt"))
    assert last["progress"]["epoch"] == 2 and last["progress"]["step"] == 0
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(last)
    assert open(out / "roc.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # A CPU run applies --cpu-malloc cache (the default) and says so.
    assert "--cpu-malloc cache" in (out / "train.log").read_text()


def test_exported_published_layout_loads_in_reference(trained):
    _, out = trained
    published = torch.load(out / "best_published.pkl", weights_only=True)
    ref = reference.PublishedTrainingWrapper(26)
    ref.load_state_dict(published)  # strict: every published key present, nothing extra
    assert len(published) == 363


def test_eval_our_checkpoint(trained):
    tmp, out = trained
    code = main(["eval", "--checkpoint", str(out / "best.pt"), *tiny_builtin(tmp)[:6],
                 "--out", str(tmp / "eval"), "--workers", "0", "--no-progress"])
    assert code == 0
    metrics = read_json(tmp / "eval" / "metrics.json")
    assert METRIC_KEYS <= set(metrics) and metrics["n"] == 5
    assert (tmp / "eval" / "roc.png").is_file()


def test_eval_on_builtin_scores_the_runs_own_validation_split(trained, capsys):
    # Without --builtin-images and --image-size, eval takes the training run's (24 images of
    # 32 px, cached where the run cached them), not the 2000 images of 64 px of its defaults.
    tmp, out = trained
    code = main(["eval", "--checkpoint", str(out / "best.pt"), "--data", "builtin",
                 "--out", str(tmp / "eval_builtin"), "--workers", "0", "--no-progress"])
    assert code == 0
    assert "the checkpoint's training run's set (24 images, 32 px)" in capsys.readouterr().out
    assert read_json(tmp / "eval_builtin" / "metrics.json")["n"] == 5  # as in training


def test_a_checkpoint_of_the_earlier_builtin_split_is_refused(trained, tmp_path, capsys):
    # The built-in images are the same files as before 2026-11-27, but that split held out
    # others: such a run would be scored on (or resumed into) its own training images.
    tmp, out = trained
    state, _ = ckpt.load_file(str(out / "last.pt"))
    assert state["builtin_split"] == builtin_data.SPLIT_VERSION
    del state["builtin_split"]  # as written before the split was recorded
    old = tmp_path / "old" / "last.pt"
    old.parent.mkdir()
    torch.save(state, old)
    assert main(["eval", "--checkpoint", str(old), "--data", "builtin", "--out",
                 str(tmp_path / "eval"), "--workers", "0", "--no-progress"]) == 2
    assert "earlier validation split" in capsys.readouterr().err
    assert main(["train", "--resume", str(old), "--no-progress"]) == 2
    assert "earlier validation split" in capsys.readouterr().err


def test_eval_trims_the_block_cache_when_the_image_size_changes(trained, tmp_path,
                                                                monkeypatch):
    # Blocks kept for one image size fit no request of another: with images of native sizes,
    # eval held 3.2 GB with the trims against 7.1 GB with the heap setting (README). The
    # kernel pool is trimmed with it.
    from sficonv_ext.cpu_allocator import large_block_cache_stats
    from sficonv_ext.train import loop
    _, out = trained
    trims, pool_trims = [], []
    real_trim, real_pool_trim = loop.trim_large_block_cache, loop.trim_kernel_pool
    monkeypatch.setattr(loop, "trim_large_block_cache",
                        lambda: trims.append((real_trim(), large_block_cache_stats()["on"])))
    monkeypatch.setattr(loop, "trim_kernel_pool", lambda: pool_trims.append(real_pool_trim()))
    folder = tmp_path / "sizes"
    for i, (label, size) in enumerate([("real", 40), ("real", 48), ("fake", 40), ("fake", 56)]):
        write_image(str(folder / label / f"{i}.png"), size, seed=i, fake=label == "fake")
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--data", str(folder), "--out",
                 str(tmp_path / "eval"), "--workers", "0", "--no-progress"]) == 0
    assert read_json(tmp_path / "eval" / "metrics.json")["n"] == 4
    assert len(trims) == 2  # three sizes in a row: 40, 48, 56
    assert all(on for _, on in trims)  # inside the default --cpu-malloc cache
    assert len(pool_trims) == 2  # the kernel pool's blocks of the last size go back too
    assert main(["predict", "--checkpoint", str(out / "best.pt"), str(folder), "--out",
                 str(tmp_path / "p.csv"), "--workers", "0", "--no-progress"]) == 0
    assert len(trims) == 4 and len(pool_trims) == 4


def test_predict_files_and_folders(trained, tmp_path):
    _, out = trained
    folder = tmp_path / "imgs"
    write_image(str(folder / "a.png"), 40, seed=1)
    write_image(str(folder / "sub" / "b.png"), 48, seed=2)
    single = write_image(str(tmp_path / "c d.png"), 36, seed=3)
    csv_path = tmp_path / "scores.csv"
    code = main(["predict", "--checkpoint", str(out), str(folder), single, "--out",
                 str(csv_path), "--batch-size", "2", "--workers", "0", "--no-progress"])
    assert code == 0
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [os.path.join(str(folder), "a.png"),
                                          os.path.join(str(folder), "sub", "b.png"), single]
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)


def _published_checkpoint(path):
    torch.manual_seed(0)
    ref = reference.PublishedTrainingWrapper(26)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    torch.save(ref.state_dict(), path)
    return ref.eval()


def test_eval_published_best_pkl_scores_as_published(tmp_path):
    ref = _published_checkpoint(tmp_path / "best.pkl")
    # Two image sizes: the published test transform does not resize, so they never share a batch.
    paths = [write_image(str(tmp_path / "data" / "real" / f"r{i}.png"), 32 + 8 * (i % 2), i)
             for i in range(3)]
    paths += [write_image(str(tmp_path / "data" / "fake" / f"f{i}.png"), 32 + 8 * (i % 2),
                          10 + i, fake=True) for i in range(3)]
    listing = tmp_path / "test.txt"
    listing.write_text("".join(f"{p} {int('fake' in p)}\n" for p in paths))
    code = main(["eval", "--checkpoint", str(tmp_path / "best.pkl"), "--data", str(listing),
                 "--out", str(tmp_path / "eval"), "--workers", "0", "--no-progress"])
    assert code == 0
    metrics = read_json(tmp_path / "eval" / "metrics.json")
    assert metrics["n"] == 6
    # What the published code computes: ToTensor + Normalize, softmax of the wrapper's logits.
    with torch.no_grad():
        expected = [torch.softmax(ref(to_normalized_tensor(open_rgb(p))[None]), 1)[0, 1].item()
                    for p in paths]
    csv_path = tmp_path / "scores.csv"
    assert main(["predict", "--checkpoint", str(tmp_path / "best.pkl"), *paths, "--out",
                 str(csv_path), "--workers", "0", "--no-progress"]) == 0
    with open(csv_path) as f:
        got = [float(r["score"]) for r in csv.DictReader(f)]
    assert got == pytest.approx(expected, abs=2e-5)


def test_output_folder_with_another_run_is_refused(trained, tmp_path, capsys):
    tmp, out = trained
    target = tmp_path / "copy"
    shutil.copytree(out, target)
    code = main(["train", *tiny_builtin(tmp), *FAST, "--out", str(target)])
    assert code == 2
    assert "holds another run" in capsys.readouterr().err
    assert main(["train", *tiny_builtin(tmp), *FAST, "--out", str(target), "--overwrite"]) == 0
    assert read_json(target / "metrics.json")["epoch"] == 1


def test_resume_of_a_finished_run_with_more_epochs(trained, tmp_path):
    tmp, out = trained
    target = tmp_path / "more"
    shutil.copytree(out, target)
    assert main(["train", "--resume", str(target), "--epochs", "3", "--no-progress"]) == 0
    with open(target / "history.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]


def test_resume_refuses_a_changed_recipe(trained, tmp_path, capsys):
    tmp, out = trained
    target = tmp_path / "changed"
    shutil.copytree(out, target)
    assert main(["train", "--resume", str(target), "--lr", "0.5"]) == 2
    assert "cannot change --lr when resuming" in capsys.readouterr().err


def test_accumulation_channels_last_published_schedule_from_yaml(tmp_path):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("channels-last: true\naccum_steps: 2\nlr_schedule: published\n"
                         "augment: published\nepochs: 2\n")
    out = tmp_path / "run"
    code = main(["train", *tiny_builtin(tmp_path), *FAST, "--config", str(yaml_file),
                 "--epochs", "2", "--out", str(out)])
    assert code == 0
    saved = (out / "config.yaml").read_text()
    assert "channels_last: true" in saved and "accum_steps: 2" in saved
    with open(out / "history.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    # builtin lr 5e-4 halved after each of the two epochs (StepLR step 1, gamma 0.5)
    assert lrs == pytest.approx([2.5e-4, 1.25e-4])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision(tmp_path, amp):
    out = tmp_path / "run"
    code = main(["train", *tiny_builtin(tmp_path), *FAST, "--amp", amp, "--out", str(out)])
    assert code == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["n"] == 5 and metrics["acc"] is not None
    code = main(["eval", "--checkpoint", str(out), *tiny_builtin(tmp_path)[:6], "--amp", amp,
                 "--out", str(tmp_path / "eval"), "--workers", "0", "--no-progress"])
    assert code == 0


def test_eval_ffpp_tree_adds_video_metrics(trained, tmp_path):
    _, out = trained
    for v in range(3):
        for f in range(2):
            write_image(str(tmp_path / "ff" / "original_sequences" / "youtube" / "c23" /
                            "frames" / f"{v:03d}" / f"{f:04d}.png"), 32, seed=10 * v + f)
            write_image(str(tmp_path / "ff" / "manipulated_sequences" / "Deepfakes" / "c23" /
                            "frames" / f"{v:03d}_{v + 3:03d}" / f"{f:04d}.png"), 32,
                        seed=100 + 10 * v + f, fake=True)
    code = main(["eval", "--checkpoint", str(out / "best.pt"), "--data", str(tmp_path / "ff"),
                 "--out", str(tmp_path / "eval"), "--workers", "0", "--no-progress"])
    assert code == 0
    metrics = read_json(tmp_path / "eval" / "metrics.json")
    assert metrics["n"] == 12
    assert metrics["video"]["n"] == 6 and METRIC_KEYS <= set(metrics["video"])


def test_export_command_bare_layout(trained, tmp_path):
    _, out = trained
    target = tmp_path / "bare.pkl"
    assert main(["export", "--checkpoint", str(out / "best.pt"), "--out", str(target),
                 "--layout", "bare"]) == 0
    net = reference.SFIConvResNet(reference.DEPTHS[26])
    net.load_state_dict(torch.load(target, weights_only=True))


def test_ddp_two_gloo_processes(tmp_path):
    data = real_fake_folder(tmp_path / "data", 10, 10)
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m"]
    result = run_module(["train", "--data", data, "--image-size", "32", "--batch-size", "8",
                         "--epochs", "2", "--workers", "0", "--no-progress", "--out", str(out),
                         "--val-fraction", "0.2", "--device", "cpu", "--deterministic"],
                        env={"OMP_NUM_THREADS": "1"}, launcher=launcher)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = read_json(out / "metrics.json")
    assert metrics["n"] == 4  # every held-out image scored once, none padded or repeated
    # rank 0 alone prints
    assert result.stdout.count("training sfi_resnet26 on 16 images") == 1
    state, _ = ckpt.load_file(str(out / "last.pt"))
    assert state["progress"]["global_step"] == 4  # 16 images / batch 8 x 2 epochs
    model = models.sfi_resnet26()
    model.load_state_dict(state["model"])


def test_eval_and_predict_with_fuse_score_like_the_unfused_model(trained, tmp_path, capsys):
    tmp, out = trained
    results = {}
    for fuse in (False, True):
        capsys.readouterr()
        flag = ["--fuse"] if fuse else []
        folder = tmp_path / f"eval{int(fuse)}"
        assert main(["eval", "--checkpoint", str(out / "best.pt"), *tiny_builtin(tmp)[:6],
                     "--out", str(folder), "--workers", "0", "--no-progress", *flag]) == 0
        csv_path = tmp_path / f"scores{int(fuse)}.csv"
        assert main(["predict", "--checkpoint", str(out), str(tmp / "cache"), "--out",
                     str(csv_path), "--image-size", "32", "--workers", "0", "--no-progress",
                     *flag]) == 0
        with open(csv_path) as f:
            rows = list(csv.DictReader(f))
        results[fuse] = (read_json(folder / "metrics.json"), rows)
        logged = capsys.readouterr()
        assert (logged.out + logged.err).count("scoring with fuse_for_inference") == (
            2 if fuse else 0)
    (plain_metrics, plain_rows), (fused_metrics, fused_rows) = results[False], results[True]
    assert fused_metrics["n"] == plain_metrics["n"] == 5
    assert fused_metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-4)
    assert [r["path"] for r in fused_rows] == [r["path"] for r in plain_rows]
    assert len(plain_rows) > 0
    for a, b in zip(fused_rows, plain_rows):
        assert float(a["score"]) == pytest.approx(float(b["score"]), abs=1e-5)
