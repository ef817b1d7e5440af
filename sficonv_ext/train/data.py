"""What a DATA argument names, turned into a list of labelled samples.

DATA is one of: a published-style list file (``path label`` per line); a folder with ``real/``
and ``fake/`` subfolders; a FaceForensics++-style tree (``original_sequences/`` and
``manipulated_sequences/`` holding one folder of frames per video, or frames extracted flat and
named ``<video>_<frame>``); or ``builtin``.
"""
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
REAL, FAKE = 0, 1
FFPP_FOLDERS = {"original_sequences": REAL, "manipulated_sequences": FAKE}


@dataclass(frozen=True)
class Sample:
    path: str                     # as written in the list or found in the folder
    label: int                    # 0 real, 1 fake (-1: unknown, for predict)
    video: Optional[str] = None   # frame folder, for video-level metrics


def is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def images_under(folder):
    """Every image file below ``folder``, in a stable (sorted) order. Linked folders are
    followed, each real folder once (a link back up the tree would list images again)."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        identity = _folder_identity(root)
        if identity in seen:
            dirs[:] = []
            continue
        seen.add(identity)
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if is_image(f)]
    return found


def _folder_identity(path):
    try:
        st = os.stat(path)
    except OSError:
        return path
    return st.st_dev, st.st_ino


def read_list_file(path):
    """Parse ``path label`` lines; the label is the last field so paths may hold spaces."""
    base = os.path.dirname(os.path.abspath(path))
    samples = []
    # utf-8-sig: a byte-order mark (Notepad writes one) is not part of the first path.
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.readlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a UTF-8 text list of 'path label' lines ({exc.reason} "
                        f"at byte {exc.start})") from None
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.rsplit(None, 1)
        if len(fields) != 2:
            raise DataError(f"{path}, line {number}: expected 'path label', got {text!r}")
        image, label = fields
        if label not in ("0", "1"):
            raise DataError(f"{path}, line {number}: label must be 0 (real) or 1 (fake), "
                            f"got {label!r}")
        if not os.path.isabs(image):
            image = os.path.join(base, image)
        samples.append(Sample(image, int(label)))
    return samples


# The version of what hold_out groups (recorded in checkpoints: a resumed run must hold out
# the same images). 2: frames in subfolders of real/ and fake/ are grouped by their folder.
# 3: frames extracted flat into one folder of a FaceForensics++ tree are grouped by the video
# their file names start with (_ffpp_videos), no longer as one video per folder.
HOLDOUT_VERSION = 3


def holdout_changed_since(version, data):
    """Whether hold_out of ``data`` (a DATA path, not builtin) holds out other images now than
    under hold-out ``version`` (None: a run from before versions were recorded)."""
    version = version or 1
    kind = describe_kind(data)
    if kind == "real_fake" and version < 2:
        return any(s.video for s in load_samples(data))
    if kind == "ffpp" and version < 3:
        # Version 2 took every frame's folder as its video.
        return any(s.video != os.path.relpath(os.path.dirname(s.path), data)
                   for s in load_samples(data))
    return False


def _real_fake_folder(path):
    """Images under real/ and fake/. Images in subfolders (``real/video_07/0001.png``) belong
    to that folder's video: held out together, and scored per video too. A class whose images
    all sit in one subfolder is taken image by image (one group would leave no validation
    image of that class)."""
    samples = []
    for name, label in (("real", REAL), ("fake", FAKE)):
        sub = os.path.join(path, name)
        if not os.path.isdir(sub):
            continue
        images = images_under(sub)
        folders = [os.path.relpath(os.path.dirname(p), path) for p in images]
        grouped = len(set(folders)) >= 2
        samples += [Sample(p, label, folder if grouped and folder != name else None)
                    for p, folder in zip(images, folders)]
    return samples


def _ffpp_tree(path):
    samples = []
    for name, label in FFPP_FOLDERS.items():
        sub = os.path.join(path, name)
        if not os.path.isdir(sub):
            continue
        frames = defaultdict(list)  # folder -> its images, in order
        for image in images_under(sub):
            folder = os.path.relpath(os.path.dirname(image), path)
            if "masks" in folder.split(os.sep):
                continue  # the manipulation masks some releases include: not frames
            frames[folder].append(image)
        for folder, images in frames.items():
            samples += [Sample(image, label, video)
                        for image, video in zip(images, _ffpp_videos(folder, images))]
    return samples


def _ffpp_ids(name):
    """The ids of a name that reads as a FaceForensics++ video: ``000`` -> [000], ``000_003``
    -> [000, 003], DeepFakeDetection's ``01_02__scene`` -> [01, 02]; None for another name."""
    ids = name.split("__", 1)[0].split("_")
    return ids if all(part.isdigit() for part in ids) else None


def _ffpp_videos(folder, images):
    """The video of each image in ``folder``. A folder per video (named ``000``,
    ``000_003``, or ``000.mp4``) is the video. Frames extracted flat, many videos to a folder
    (``c23/images/000_003_0012.png``), would make the folder one huge "video": a hold-out
    would then take a whole manipulation method and no real frame at all. Those are grouped
    by the video their names start with (the name less its trailing ``_<frame>``) when at
    least two videos show and each has two frames on average (names that parse but do not
    repeat, such as ``<frame>_<face>`` inside a video's folder, are not videos). Names that
    do not parse stay together as the folder's group, as before."""
    if _ffpp_ids(os.path.splitext(os.path.basename(folder))[0]) is not None:
        return [folder] * len(images)
    prefixes = [_flat_frame_video(image) for image in images]
    named = [prefix for prefix in prefixes if prefix is not None]
    videos = len(set(named))
    if videos < 2 or len(named) < 2 * videos:
        return [folder] * len(images)
    return [folder if prefix is None else os.path.join(folder, prefix) for prefix in prefixes]


def _flat_frame_video(image):
    """``000_003`` for ``.../000_003_0012.png``; None for a name that is not ``<video>_<frame>``."""
    stem, _, frame = os.path.splitext(os.path.basename(image))[0].rpartition("_")
    return stem if frame.isdigit() and stem and _ffpp_ids(stem) is not None else None


def describe_kind(path):
    if os.path.isfile(path):
        return "list"
    if os.path.isdir(path):
        entries = set(os.listdir(path))
        if entries & set(FFPP_FOLDERS):
            return "ffpp"
        if entries & {"real", "fake"}:
            return "real_fake"
        raise DataError(f"{path} is a folder without real/ and fake/ subfolders (or "
                        f"original_sequences/ and manipulated_sequences/ for a "
                        f"FaceForensics++-style tree)")
    raise DataError(f"data {path!r} does not exist (expected a list file, a folder with real/ "
                    f"and fake/, a FaceForensics++-style tree, or 'builtin')")


def load_samples(path):
    """All samples named by a list file or a folder (not ``builtin``; see :mod:`.datasets`)."""
    kind = describe_kind(path)
    if kind == "list":
        return read_list_file(path)
    if kind == "ffpp":
        return _ffpp_tree(path)
    return _real_fake_folder(path)


def drop_missing(samples, strict, log):
    """Remove samples whose file is missing; count them in the log (``strict``: stop)."""
    kept, missing = [], []
    for s in samples:
        (kept if os.path.isfile(s.path) else missing).append(s)
    if missing:
        if strict:
            raise DataError(f"image not found: {missing[0].path}")
        shown = ", ".join(s.path for s in missing[:3])
        log(f"warning: skipped {len(missing)} missing image(s): {shown}"
            + (" ..." if len(missing) > 3 else ""))
    return kept, len(missing)


def hold_out(samples, fraction, seed):
    """Split off a seeded ``fraction`` for validation, per class, whole groups at a time.

    Samples without a video are their own group. Frames of videos are grouped so that no
    face or scene is on both sides: FaceForensics++ names a real video by its id (``000``) and
    a fake by target and source ids (``000_003``, the same name under every method and
    compression), so a group is every video linked through a shared id
    (:func:`_video_groups`). Returns ``(train, val)``; each keeps the input order. At least
    one group per class is held out where a class has two or more groups, so the validation
    set has both classes if it can.
    """
    groups = _video_groups(samples, fraction)  # group key -> sample indices
    for i, s in enumerate(samples):
        if s.video is None:
            groups[("sample", i)] = [i]
    labels_of = {key: {samples[i].label for i in members} for key, members in groups.items()}
    rng = np.random.default_rng(seed)
    held_keys = set()
    for label in sorted({s.label for s in samples}):
        keys = [k for k in groups if label in labels_of[k]]
        n_val = int(round(fraction * len(keys)))
        if n_val == 0 and len(keys) >= 2 and fraction > 0:
            n_val = 1
        # A group held out for another class may already count towards this one.
        n_val -= sum(1 for k in keys if k in held_keys)
        for j in rng.permutation(len(keys)):
            if n_val <= 0:
                break
            if keys[j] not in held_keys:
                held_keys.add(keys[j])
                n_val -= 1
    held = {i for key in held_keys for i in groups[key]}
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    return train, val


def _video_ids(video):
    """The ids a video folder's name links it by (:func:`_ffpp_ids`); another name is its own
    id."""
    name = os.path.basename(video)
    return _ffpp_ids(name) or [name.split("__", 1)[0]]


def _video_groups(samples, fraction):
    """Sample indices of videos grouped by linked ids (connected components). A component of
    more than ``fraction`` of the videos (fakes that pair every identity with many others) is
    grouped by first (target) id instead: a held-out fake's source face may then appear in
    training, but never its scene, its method twins or its real video."""
    videos = OrderedDict()  # video -> sample indices, in input order
    for i, s in enumerate(samples):
        if s.video is not None:
            videos.setdefault(s.video, []).append(i)
    parent = {}

    def root(a):
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for video in videos:
        first, *others = _video_ids(video)
        for other in others:
            parent[root(other)] = root(first)
    sizes = defaultdict(int)
    for video in videos:
        sizes[root(_video_ids(video)[0])] += 1
    limit = max(1, fraction * len(videos))
    groups = OrderedDict()
    for video, members in videos.items():
        target = _video_ids(video)[0]
        # Per linked group: one that pairs many ids (DeepFakeDetection's actors) falls back to
        # target ids alone, and the rest of the tree stays linked.
        component = root(target)
        key = ("linked", component) if sizes[component] <= limit else ("target", target)
        groups.setdefault(key, []).extend(members)
    return groups


def class_counts(samples):
    real = sum(1 for s in samples if s.label == REAL)
    return real, len(samples) - real
