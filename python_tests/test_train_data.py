"""Data sources, hold-out, batch plans, transforms, the built-in data set and configuration."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sficonv_ext.train import builtin_data, config
from sficonv_ext.train.data import Sample, hold_out, load_samples, read_list_file
from sficonv_ext.train.errors import DataError, UserError
from sficonv_ext.train.sampling import TrainPlan, size_grouped_batches, shard
from sficonv_ext.train.transforms import (EvalTransform, TrainTransform, perspective_coefficients,
                                          to_normalized_tensor)
from test_train_support import real_fake_folder, write_image


def test_list_file_paths_with_spaces_relative_and_comments(tmp_path):
    write_image(str(tmp_path / "sub dir" / "a b.png"))
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\n\nsub dir/a b.png 1\n/abs/x.png 0\n")
    samples = read_list_file(str(listing))
    assert [s.label for s in samples] == [1, 0]
    assert samples[0].path == os.path.join(str(tmp_path), "sub dir", "a b.png")
    assert samples[1].path == "/abs/x.png"


@pytest.mark.parametrize("line, message", [("img.png 2", "line 2: label must be 0"),
                                           ("img.png", "line 2: expected 'path label'"),
                                           ("img.png real", "line 2: label must be 0")])
def test_list_file_errors_name_file_and_line(tmp_path, line, message):
    listing = tmp_path / "bad.txt"
    listing.write_text(f"ok.png 0\n{line}\n")
    with pytest.raises(DataError, match=message) as info:
        read_list_file(str(listing))
    assert str(listing) in str(info.value)


def test_real_fake_folder(tmp_path):
    real_fake_folder(tmp_path, 2, 3)
    samples = load_samples(str(tmp_path))
    assert [s.label for s in samples] == [0, 0, 1, 1, 1]
    assert all(s.video is None for s in samples)


def test_frames_in_real_fake_subfolders_are_held_out_by_video(tmp_path):
    for label in ("real", "fake"):
        for v in range(5):
            for f in range(4):
                write_image(str(tmp_path / label / f"vid{v}" / f"{f:03d}.png"), 16, seed=f)
    write_image(str(tmp_path / "real" / "loose.png"), 16)  # directly in real/: its own group
    samples = load_samples(str(tmp_path))
    assert {s.video for s in samples if s.path.endswith("loose.png")} == {None}
    assert len({s.video for s in samples}) == 11
    train, val = hold_out(samples, 0.2, seed=7)
    assert {s.video for s in train if s.video}.isdisjoint({s.video for s in val if s.video})
    assert {s.label for s in val} == {0, 1}


def test_a_class_in_one_subfolder_is_taken_image_by_image(tmp_path):
    # One group per class would leave that class without validation images.
    for i in range(5):
        write_image(str(tmp_path / "real" / "images" / f"{i}.png"), 16, seed=i)
        write_image(str(tmp_path / "fake" / "images" / f"{i}.png"), 16, seed=i)
    samples = load_samples(str(tmp_path))
    assert all(s.video is None for s in samples)
    assert {s.label for s in hold_out(samples, 0.2, seed=7)[1]} == {0, 1}


def test_ffpp_masks_are_not_frames(tmp_path):
    write_image(str(tmp_path / "original_sequences" / "youtube" / "c23" / "images" / "000"
                    / "0000.png"))
    write_image(str(tmp_path / "manipulated_sequences" / "Deepfakes" / "c23" / "images"
                    / "000_003" / "0000.png"))
    write_image(str(tmp_path / "manipulated_sequences" / "Deepfakes" / "masks" / "images"
                    / "000_003" / "0000.png"))
    assert [s.video.split(os.sep)[2] for s in load_samples(str(tmp_path))] == ["c23", "c23"]


@pytest.mark.parametrize("mode,values,want", [
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),         # float in [0, 1]
    ("F", [0.0, 128.0, 255.0], [0, 128, 255]),     # float holding 8-bit values
    ("I", [0, 128, 255], [0, 128, 255]),           # 32-bit integer holding 8-bit values
    ("I", [0, 32896, 65535], [0, 128, 255]),       # 16-bit values
    ("I;16", [0, 128, 255], [0, 0, 1]),            # a 16-bit file: its range is 0-65535
])
def test_high_depth_greyscale_is_scaled_from_the_range_it_holds(tmp_path, mode, values, want):
    from sficonv_ext.train.images import open_rgb
    dtype = {"F": np.float32, "I": np.int32, "I;16": np.uint16}[mode]
    image = Image.fromarray(np.array([values], dtype=dtype))
    assert image.mode == mode
    path = str(tmp_path / "grey.tif")
    image.save(path)
    rgb = np.asarray(open_rgb(path))
    assert rgb[0, :, 0].tolist() == want and (rgb[..., 0] == rgb[..., 2]).all()


def test_a_tilde_in_a_data_path_is_expanded_for_every_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for command in ("train", "eval"):
        cfg = config.resolve(command, {"data": "~/faces"})
        assert cfg["data"] == os.path.join(str(tmp_path), "faces")
    assert config.resolve("eval", {"data": "builtin"})["data"] == "builtin"


def test_ffpp_tree_video_ids_and_hold_out_by_video(tmp_path):
    for v in range(4):
        for f in range(3):
            write_image(str(tmp_path / "original_sequences" / "youtube" / "c23" / "frames"
                            / f"{v:03d}" / f"{f:04d}.png"))
            write_image(str(tmp_path / "manipulated_sequences" / "Deepfakes" / "c23" / "frames"
                            / f"{v:03d}_{v + 1:03d}" / f"{f:04d}.png"))
    samples = load_samples(str(tmp_path))
    assert len(samples) == 24 and len({s.video for s in samples}) == 8
    assert {s.label for s in samples if s.video.startswith("original")} == {0}
    train, val = hold_out(samples, 0.25, seed=7)
    assert {s.video for s in train}.isdisjoint({s.video for s in val})
    assert {s.label for s in val} == {0, 1}  # one video of each class held out
    assert len(val) == 6
    again = hold_out(samples, 0.25, seed=7)[1]
    assert [s.path for s in again] == [s.path for s in val]


def _flat_ffpp_tree(root, videos=8, frames=2):
    # Frames extracted flat: every video of a method in one folder, named <video>_<frame>;
    # fakes swap faces pairwise (000_001 and 001_000), as FaceForensics++ does.
    for v in range(videos):
        for f in range(frames):
            write_image(str(root / "original_sequences" / "youtube" / "c23" / "images"
                            / f"{v:03d}_{f:04d}.png"))
            for method in ("Deepfakes", "FaceSwap"):
                write_image(str(root / "manipulated_sequences" / method / "c23" / "images"
                                / f"{v:03d}_{v ^ 1:03d}_{f:04d}.png"))


def test_ffpp_frames_extracted_flat_are_grouped_by_the_video_their_names_start_with(tmp_path):
    # One folder as one "video" would hold out a whole method and no real frame at all.
    _flat_ffpp_tree(tmp_path)
    samples = load_samples(str(tmp_path))
    assert len(samples) == 48 and len({s.video for s in samples}) == 24
    assert {os.path.basename(s.video) for s in samples if s.label == 0} == {
        f"{v:03d}" for v in range(8)}
    train, val = hold_out(samples, 0.25, seed=7)
    assert {s.label for s in val} == {0, 1}
    assert {s.video for s in train}.isdisjoint({s.video for s in val})
    # Ids link across methods and to the real video: no face of a held-out video is trained on.
    ids = lambda part: {i for s in part for i in os.path.basename(s.video).split("_")}
    assert ids(train).isdisjoint(ids(val))


def test_ffpp_flat_frames_group_what_parses_and_leave_the_rest_with_the_folder(tmp_path):
    # One odd file name (a copy) must not turn a whole flat folder back into one group.
    _flat_ffpp_tree(tmp_path, videos=4)
    odd = (tmp_path / "manipulated_sequences" / "Deepfakes" / "c23" / "images"
           / "000_001_0000 (copy).png")
    write_image(str(odd))
    videos = {s.path: s.video for s in load_samples(str(tmp_path))}
    folder = os.path.join("manipulated_sequences", "Deepfakes", "c23", "images")
    assert videos[str(odd)] == folder
    assert sum(v == folder for v in videos.values()) == 1
    assert len({v for v in videos.values() if v.startswith(folder + os.sep)}) == 4


def test_ffpp_video_folders_with_frames_named_frame_and_face_stay_videos(tmp_path):
    # A folder per video named 000.mp4, frames named <frame>_<face>: the frame numbers are not
    # videos (they would put every video on both sides of the split).
    for video in ("000.mp4", "001.mp4"):
        for frame in range(3):
            write_image(str(tmp_path / "original_sequences" / "c23" / video
                            / f"{frame:04d}_0.png"))
    for video in ("a_clip", "b_clip"):  # not video-like names, frames that do not repeat
        for frame in range(3):
            write_image(str(tmp_path / "manipulated_sequences" / "X" / video
                            / f"{frame:04d}_0.png"))
    videos = {os.path.basename(s.video) for s in load_samples(str(tmp_path))}
    assert videos == {"000.mp4", "001.mp4", "a_clip", "b_clip"}


def test_ffpp_folders_that_do_not_name_videos_stay_one_group(tmp_path):
    # Names that do not read as <video>_<frame> (or a single video's frames) are not guessed at.
    for name in ("a.png", "b_0001.png"):
        write_image(str(tmp_path / "original_sequences" / "youtube" / "c23" / "images" / name))
    for name in ("000_003_0000.png", "000_003_0001.png"):
        write_image(str(tmp_path / "manipulated_sequences" / "Deepfakes" / "c23" / "images"
                        / name))
    videos = {s.video for s in load_samples(str(tmp_path))}
    assert videos == {os.path.join("original_sequences", "youtube", "c23", "images"),
                      os.path.join("manipulated_sequences", "Deepfakes", "c23", "images")}


def test_unknown_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_samples(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="real/ and fake/"):
        load_samples(str(tmp_path / "empty"))


def test_train_plan_resumes_and_splits_exactly():
    full = TrainPlan(50, 8, seed=3)
    batches = list(full.micro_batches(epoch=2))
    assert len(batches) == 6 and all(len(b) == 8 for b in batches)
    assert list(full.micro_batches(epoch=2, start_step=4)) == batches[4:]
    assert batches != list(full.micro_batches(epoch=3))
    # Two ranks with two accumulation steps share each global batch without overlap.
    parts = [list(TrainPlan(50, 8, 3, world_size=2, rank=r, accum_steps=2).micro_batches(2))
             for r in range(2)]
    for step in range(6):
        pieces = [parts[r][step * 2 + a] for r in range(2) for a in range(2)]
        assert sorted(i for p in pieces for i in p) == sorted(batches[step])
    with pytest.raises(UserError, match="fewer than 2 images"):
        TrainPlan(50, 4, 3, world_size=2, accum_steps=2)


def test_size_grouped_batches_never_mix_sizes():
    sizes = [(32, 32), (40, 32), (32, 32), None, (40, 32), (32, 32)]
    batches = size_grouped_batches(sizes, 2)
    assert batches == [[0, 2], [5], [1, 4]]
    assert shard(batches, 2, 0) == [[0, 2], [1, 4]] and shard(batches, 2, 1) == [[5]]


def test_test_transform_is_published_to_tensor_and_normalize():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    got = to_normalized_tensor(Image.fromarray(array))
    # torchvision: ToTensor (HWC uint8 -> CHW float / 255) then Normalize (sub mean, div std).
    expected = torch.from_numpy(array).permute(2, 0, 1).float().div(255)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.equal(got, (expected - mean) / std)
    assert EvalTransform()(Image.fromarray(array)).shape == (3, 7, 9)  # no resizing
    assert EvalTransform(16)(Image.fromarray(array)).shape == (3, 16, 16)


def test_perspective_coefficients_map_corners():
    dst = [(3, 2), (60, 5), (58, 61), (1, 59)]
    src = [(0, 0), (63, 0), (63, 63), (0, 63)]
    a, b, c, d, e, f, g, h = perspective_coefficients(dst, src)
    for (x, y), (u, v) in zip(dst, src):
        w = g * x + h * y + 1
        assert abs((a * x + b * y + c) / w - u) < 1e-9 and abs((d * x + e * y + f) / w - v) < 1e-9


@pytest.mark.parametrize("augment", ["published", "light", "none"])
def test_train_transform_is_seeded_per_sample(augment):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), np.uint8))
    t = TrainTransform(32, augment)
    first = t(image, np.random.default_rng([7, 1, 5]))
    assert first.shape == (3, 32, 32)
    assert torch.equal(first, t(image, np.random.default_rng([7, 1, 5])))
    if augment != "none":
        others = [t(image, np.random.default_rng([7, 1, k])) for k in range(6, 12)]
        assert any(not torch.equal(first, o) for o in others)


def test_builtin_data_is_deterministic_and_offline(tmp_path):
    a_train, a_val = builtin_data.builtin_lists(32, 12, cache_root=str(tmp_path / "a"),
                                                progress=False, log=lambda *_: None)
    b_train, b_val = builtin_data.builtin_lists(32, 12, cache_root=str(tmp_path / "b"),
                                                progress=False, log=lambda *_: None)
    for a, b in ((a_train, b_train), (a_val, b_val)):
        sa, sb = read_list_file(a), read_list_file(b)
        assert [s.label for s in sa] == [s.label for s in sb]
        for x, y in zip(sa, sb):
            assert open(x.path, "rb").read() == open(y.path, "rb").read()
    samples = read_list_file(a_train) + read_list_file(a_val)
    assert len(samples) == 12 and {s.label for s in samples} == {0, 1}
    assert Image.open(samples[0].path).size == (32, 32)
    assert {os.path.basename(s.path).split("_")[0] for s in samples} == {"real", "fake"}
    # A second call reuses the cache.
    assert builtin_data.builtin_lists(32, 12, cache_root=str(tmp_path / "a"),
                                      progress=False, log=pytest.fail) == (a_train, a_val)


def test_builtin_reads_only_bundled_photographs():
    folder = builtin_data.photo_folder()
    for name in builtin_data.PHOTOS:
        assert os.path.isfile(os.path.join(folder, name))


def test_config_precedence_and_validation(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("epochs: 3\nbatch-size: 16\nlr: 0.01\n")
    values = config.read_yaml(str(yaml_file), "train")
    cfg = config.resolve("train", {"epochs": 5}, values)
    assert cfg["epochs"] == 5 and cfg["batch_size"] == 16 and cfg["lr"] == 0.01
    assert cfg["seed"] == 7 and cfg["lr_schedule"] == "cosine" and cfg["augment"] == "published"
    builtin = config.resolve("train", {"data": "builtin"}, {"epochs": 2})
    assert builtin["epochs"] == 2 and builtin["image_size"] == 64
    yaml_file.write_text("epochz: 3\n")
    with pytest.raises(UserError, match="unknown option 'epochz'"):
        config.read_yaml(str(yaml_file), "train")
    yaml_file.write_text("epochs: -1\n")
    with pytest.raises(UserError, match="bad value -1 for epochs"):
        config.read_yaml(str(yaml_file), "train")
    yaml_file.write_text("augment: heavy\n")
    with pytest.raises(UserError, match="augment must be one of"):
        config.read_yaml(str(yaml_file), "train")


def test_best_metric_direction():
    from sficonv_ext.train.distributed import Context
    from sficonv_ext.train.trainer import Run

    for metric, worse, better in (("acc", 0.5, 0.7), ("eer", 0.3, 0.1), ("loss", 0.7, 0.6)):
        run = Run({"best_metric": metric}, Context(), reporter=None)
        assert run.improved({metric: worse})
        run.best = {"metric": metric, "value": worse, "epoch": 1}
        assert run.improved({metric: better})
        assert not run.improved({metric: worse})  # a tie keeps the earlier checkpoint
        assert not run.improved({metric: None})


def _ffpp_samples(pairs, methods=("Deepfakes", "Face2Face", "FaceSwap"), frames=2):
    """FaceForensics++-style samples: a real video per id, a fake per (target, source) pair
    and method, under two compressions."""
    samples = []
    for quality in ("c23", "c40"):
        for vid in sorted({i for pair in pairs for i in pair}):
            folder = f"original_sequences/youtube/{quality}/frames/{vid}"
            samples += [Sample(f"{folder}/{f}.png", 0, folder) for f in range(frames)]
        for method in methods:
            for target, source in pairs:
                folder = f"manipulated_sequences/{method}/{quality}/frames/{target}_{source}"
                samples += [Sample(f"{folder}/{f}.png", 1, folder) for f in range(frames)]
    return samples


def _ids_of(samples):
    return {i for s in samples for i in s.video.rsplit("/", 1)[1].split("_")}


def _target_ids(samples):
    return {s.video.rsplit("/", 1)[1].split("_")[0] for s in samples}


def test_ffpp_hold_out_keeps_every_identity_on_one_side():
    # FaceForensics++ pairs ids both ways (000_003 and 003_000): a held-out fake's scene,
    # its face, its twins under other methods and compressions and both real videos are
    # all held out together.
    ids = [f"{i:03d}" for i in range(40)]
    pairs = [(ids[i], ids[i + 1]) for i in range(0, 40, 2)]
    pairs += [(b, a) for a, b in pairs]
    samples = _ffpp_samples(pairs)
    train, val = hold_out(samples, 0.2, seed=3)
    assert _ids_of(train).isdisjoint(_ids_of(val))
    assert {s.label for s in val} == {0, 1}
    assert len(_ids_of(val)) == 8  # 4 of the 20 pairs
    assert len(train) + len(val) == len(samples)


def test_ffpp_hold_out_falls_back_to_target_ids_when_ids_chain_together():
    # Fakes that link every id to the next would make one group of everything: held out by
    # target id instead, so a fake never leaves its scene's real video or its method twins.
    ids = [f"{i:03d}" for i in range(10)]
    pairs = [(ids[i], ids[(i + 3) % 10]) for i in range(10)]
    train, val = hold_out(_ffpp_samples(pairs), 0.2, seed=7)
    assert val and train
    assert _target_ids(train).isdisjoint(_target_ids(val))
    assert {s.label for s in val} == {0, 1}


def test_ffpp_hold_out_falls_back_only_for_the_group_that_links_too_much():
    # A DeepFakeDetection-like block (every actor paired with every other) forms one linked
    # group larger than the held-out share; FaceForensics++'s swap pairs must stay linked.
    ids = [f"{i:03d}" for i in range(40)]
    pairs = [(ids[i], ids[i + 1]) for i in range(0, 40, 2)]
    pairs += [(b, a) for a, b in pairs]
    samples = _ffpp_samples(pairs, frames=1)
    actors = [f"{i:02d}" for i in range(12)]
    for a in actors:
        folder = f"original_sequences/actors/c23/frames/{a}__talking"
        samples.append(Sample(f"{folder}/0.png", 0, folder))
        for b in actors:
            if a != b:
                folder = f"manipulated_sequences/DeepFakeDetection/c23/frames/{a}_{b}__talking"
                samples.append(Sample(f"{folder}/0.png", 1, folder))
    train, val = hold_out(samples, 0.2, seed=5)
    assert _youtube_ids(train).isdisjoint(_youtube_ids(val))
    assert _youtube_ids(val)  # the linked pairs still take part in the hold-out


def _youtube_ids(samples):
    return _ids_of([s for s in samples if "DeepFake" not in s.video and "actors" not in s.video])


def test_builtin_validation_split_does_not_depend_on_the_set_size():
    # Image i is the same image in a set of any size: a model trained on 500 images must not
    # meet its training images in the validation split of the 2000-image set.
    small, large = (set(builtin_data.validation_indices(n)) for n in (500, 2000))
    assert small == {i for i in large if i < 500}
    assert 0.15 < len(large) / 2000 < 0.25
    tiny = builtin_data.validation_indices(8)
    assert {i % 2 for i in tiny} == {0, 1}  # both classes even in the smallest set


def test_a_run_of_unreadable_images_counts_each_once(tmp_path):
    # Three unreadable images in a row: each fails as its own sample and again while standing
    # in for the one before it; only the first counts (the count was once 3 + 2 + 1 = 6).
    from sficonv_ext.train.images import ImageDataset, collate
    samples = []
    for i in range(3):
        bad = tmp_path / f"bad{i}.png"
        bad.write_bytes(b"not an image")
        samples.append(Sample(str(bad), 0))
    for i in range(3):
        write_image(str(tmp_path / f"good{i}.png"), 16, seed=i)
        samples.append(Sample(str(tmp_path / f"good{i}.png"), 1))
    data = ImageDataset(samples, lambda image, rng: torch.zeros(3, 2, 2), substitute=True)
    batch = collate([data[i] for i in range(len(samples))])
    assert len(batch.labels) == 6
    assert sorted(f.path for f in batch.failures if f.requested) == [s.path for s in samples[:3]]


def test_a_too_small_micro_batch_names_the_batch_the_user_asked_for():
    with pytest.raises(UserError, match=r"^--batch-size 6 split over 1 process\(es\) x 4 "
                                        r"accumulation step\(s\).*raise --batch-size"):
        TrainPlan(100, 6, seed=0, accum_steps=4)
    # Cut to a 6-image data set: raising --batch-size cannot help, and the message says so.
    with pytest.raises(UserError, match=r"^a batch of 6 \(--batch-size 7, cut to the 6 training "
                                        r"images\).*lower --accum-steps or add training images"):
        TrainPlan(6, 7, seed=0, accum_steps=4)
    with pytest.raises(UserError, match=r"^--batch-size 6 split .*lower --accum-steps or add "):
        TrainPlan(6, 6, seed=0, accum_steps=4)
