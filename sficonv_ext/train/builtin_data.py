"""``--data builtin``: a small deterministic real/fake data set built offline.

Real images are random crops of the colour photographs that ship inside scikit-image's wheel
(read straight from the installed package folder, so nothing is ever downloaded); fakes are
self-blended crops (:mod:`.blending`). The set is written once as PNG files plus published-style
list files (``train.txt``, ``val.txt``) in a cache folder keyed by everything that shapes it.
"""
import hashlib
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from .blending import self_blend
from .errors import DataError

# Colour photographs bundled in the scikit-image wheel (never the ones its pooch registry fetches).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
FORMAT_VERSION = 3  # 3: validation split by a fixed draw per image
# The validation split's version, recorded in every checkpoint of a run on the built-in set:
# the images of version 2 were the same files, but its split (a permutation drawn after them)
# held out other images, so a run of it would meet its training images in this split.
SPLIT_VERSION = 3
DEFAULT_SEED = 2022
VAL_FRACTION = 0.2


def photo_folder():
    try:
        import skimage
    except ImportError as exc:
        raise DataError("--data builtin needs scikit-image (pip install scikit-image): its "
                        "wheel ships the photographs the built-in data set is made from") from exc
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def _photo_paths():
    folder = photo_folder()
    paths = [os.path.join(folder, name) for name in PHOTOS]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"the installed scikit-image lacks bundled photographs: "
                        f"{', '.join(missing)}")
    return paths


def default_cache_root():
    if os.environ.get("SFICONV_CACHE_DIR"):
        return os.environ["SFICONV_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sficonv_ext")


def _cache_key(paths, image_size, count, seed):
    digest = hashlib.sha256(f"v{FORMAT_VERSION}-{image_size}-{count}-{seed}".encode())
    for path in paths:  # a changed photograph gives a new data set, never a stale one
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return f"builtin-s{image_size}-n{count}-{digest.hexdigest()[:12]}"


def _random_crop(photo, size, rng):
    # Square crops from a quarter to two thirds of the short side, resized to ``size``.
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.25, 0.67) * min(h, w))
    side = max(side, min(size, h, w))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    crop = crop.resize((size, size), Image.BILINEAR)
    return np.asarray(crop, dtype=np.float64) / 255.0


def _validation_draw(i, seed):
    digest = hashlib.sha256(f"val-{seed}-{i}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def validation_indices(count, seed=DEFAULT_SEED):
    """The images of a set of ``count`` held out for validation: image ``i`` (the same image
    in a set of any size) is held out by a fixed draw of its own, so a model trained on the
    set of one size never meets its training images in the validation split of another.
    Sets too small to draw an image of each class get the lowest draw of the missing class."""
    draws = [_validation_draw(i, seed) for i in range(count)]
    val = {i for i in range(count) if draws[i] < VAL_FRACTION}
    for label in (0, 1):  # image i is fake when i is odd
        if not any(i % 2 == label for i in val):
            val.add(min(range(label, count, 2), key=draws.__getitem__))
    return sorted(val)


def check_split_version(recorded, checkpoint, action):
    """Refuse to ``action`` (resume, evaluate) a checkpoint of a run on the built-in set whose
    validation split was another version's (``recorded``: its ``builtin_split``; None before it
    was recorded)."""
    if recorded != SPLIT_VERSION:
        raise DataError(f"{checkpoint} was trained on the built-in data set's earlier "
                        f"validation split, which held out other images: this version's "
                        f"split would hold images it trained on. Cannot {action} on --data "
                        f"builtin; use another data set or train a new run")


def _generate(folder, paths, image_size, count, seed, progress):
    from tqdm import tqdm

    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    os.makedirs(os.path.join(folder, "images"))
    rng = np.random.default_rng(seed)
    lines = []
    for i in tqdm(range(count), desc="building the built-in data set", disable=not progress,
                  mininterval=1.0):
        label = i % 2
        crop = _random_crop(photos[int(rng.integers(len(photos)))], image_size, rng)
        if label:
            crop = self_blend(crop, rng)
        name = f"images/{'fake' if label else 'real'}_{i:05d}.png"
        Image.fromarray(np.round(np.clip(crop, 0, 1) * 255).astype(np.uint8)).save(
            os.path.join(folder, name))
        lines.append(f"{name} {label}\n")
    val = validation_indices(count, seed)
    train = sorted(set(range(count)) - set(val))
    with open(os.path.join(folder, "train.txt"), "w") as f:
        f.writelines(lines[i] for i in train)
    with open(os.path.join(folder, "val.txt"), "w") as f:
        f.writelines(lines[i] for i in val)


def builtin_lists(image_size, count, seed=DEFAULT_SEED, cache_root=None, progress=True,
                  log=print):
    """Build the data set if needed; return the paths of its ``train.txt`` and ``val.txt``."""
    if count < 8:
        raise DataError(f"the built-in data set needs at least 8 images, got {count}")
    paths = _photo_paths()
    root = cache_root or default_cache_root()
    folder = os.path.join(root, _cache_key(paths, image_size, count, seed))
    if not os.path.isfile(os.path.join(folder, "val.txt")):
        os.makedirs(root, exist_ok=True)
        log(f"building the built-in data set ({count} images of {image_size}x{image_size}) "
            f"in {folder}")
        # Built aside and renamed into place, so an interrupted build never looks complete.
        scratch = tempfile.mkdtemp(prefix=".building-", dir=root)
        try:
            work = os.path.join(scratch, "set")
            _generate(work, paths, image_size, count, seed, progress)
            try:
                os.rename(work, folder)
            except OSError:
                if not os.path.isfile(os.path.join(folder, "val.txt")):
                    raise  # not a concurrent build that finished first
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return os.path.join(folder, "train.txt"), os.path.join(folder, "val.txt")
