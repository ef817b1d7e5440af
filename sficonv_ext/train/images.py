"""Reading images for a DataLoader, with unreadable files skipped and counted (or fatal with
``strict``)."""
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from .errors import DataError


class UnreadableImageError(DataError):
    pass


def open_rgb(path):
    with Image.open(path) as image:
        image.load()  # decode now, so a truncated file fails here and not later
        if image.mode.startswith("I;16") or image.mode in ("I", "F"):
            return _high_depth_to_rgb(image)
        return image.convert("RGB")


def _high_depth_to_rgb(image):
    # PIL's convert("RGB") clips 16-bit grey values at 255 (a near-white image) and maps
    # float ones in [0, 1] to black: scale to 8 bits instead. The range is read from the data,
    # since these modes do not say it: 16-bit files ("I;16", and "I" as PIL opens 16-bit PNGs)
    # span 0-65535, but a 32-bit integer or float image may hold 8-bit values (ImageJ, NumPy
    # output), and a float one [0, 1]. So: at most 1 (float) -> x255; at most 255 -> as it is;
    # above -> /257 (65535 -> 255).
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    peak = float(finite.max()) if finite.size else 0.0
    if image.mode == "F" and peak <= 1.0:
        scaled = values * 255.0
    elif peak <= 255.0 and not image.mode.startswith("I;16"):
        scaled = values
    else:
        scaled = values / 257.0
    grey = np.clip(np.nan_to_num(np.rint(scaled)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def image_size(path):
    """``(width, height)`` from the header, or None if the file cannot be identified."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # noqa: BLE001 - any failure means "unreadable", counted by the caller
        return None


@dataclass
class Failure:
    index: int
    path: str
    reason: str
    # False for an image that failed while standing in for an unreadable one: that image is
    # requested (and counted) as its own sample too.
    requested: bool = True


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``(image tensor, label, index, failures)``; a key is an index or
    ``(index, epoch)``.

    The augmentation generator is seeded from (seed, epoch, index), so a sample is transformed the
    same way whichever worker or rank loads it and whether or not the run was resumed.

    An unreadable image is recorded as a :class:`Failure`. With ``substitute`` (training) the next
    readable sample takes its place, so every batch keeps its size: ranks stay in step and
    BatchNorm never sees a batch of one. Without it (evaluation) the item is the failure alone.
    With ``strict`` the first unreadable image stops the run, naming the file.
    """

    MAX_SUBSTITUTES = 16

    def __init__(self, samples, transform, seed=0, strict=False, substitute=False):
        self.samples, self.transform = samples, transform
        self.seed, self.strict, self.substitute = seed, strict, substitute

    def __len__(self):
        return len(self.samples)

    def _load(self, index, epoch):
        sample = self.samples[index]
        try:
            image = open_rgb(sample.path)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
            if self.strict:
                raise UnreadableImageError(f"cannot read image {sample.path}: {exc}") from None
            return Failure(index, sample.path, str(exc))
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.transform(image, rng), sample.label, index

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        failures = []
        tries = min(len(self.samples), self.MAX_SUBSTITUTES) if self.substitute else 1
        for attempt in range(tries):
            item = self._load((index + attempt) % len(self.samples), epoch)
            if not isinstance(item, Failure):
                return (*item, failures)
            failures.append(item if attempt == 0 else replace(item, requested=False))
        if self.substitute:
            raise UnreadableImageError(
                f"{len(failures)} unreadable images in a row from {failures[0].path}: "
                f"is the data set readable? ({failures[0].reason})")
        return failures[0]


@dataclass
class Batch:
    images: torch.Tensor   # [n, 3, H, W]; n may be 0 when every image failed
    labels: torch.Tensor
    indices: torch.Tensor
    failures: list


def collate(items):
    good = [item for item in items if not isinstance(item, Failure)]
    failures = [item for item in items if isinstance(item, Failure)]
    for item in good:
        failures += item[3]
    if good:
        images = torch.stack([item[0] for item in good])
    else:
        images = torch.empty(0, 3, 0, 0)
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    indices = torch.tensor([item[2] for item in good], dtype=torch.long)
    return Batch(images, labels, indices, failures)
