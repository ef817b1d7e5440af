"""Image transforms, written on PIL and numpy (no torchvision dependency).

Test transform (eval, predict): the published one, to tensor and ImageNet normalisation with no
resizing, in the same float32 operations as torchvision's ToTensor + Normalize, so a published
checkpoint scores exactly as the published code scores it.

Training augmentations (``--augment``):
- ``published``: horizontal flip, rotation within +-10 degrees, random perspective (p 0.5,
  distortion 0.5), as the published recipe. Rotation and perspective resample every image,
  which can wipe out the very high-frequency traces a detector relies on.
- ``light``: horizontal flip and a random crop; no resampling beyond fitting the size.
- ``none``: fit the size only.
Each sample's randomness comes from its own generator (seed, epoch, index), so augmentation does
not depend on worker count, rank, or where a resumed run restarted.
"""
import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float32)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float32)
AUGMENTS = ("published", "light", "none")


def to_normalized_tensor(image):
    """PIL RGB image -> float32 ``[3, H, W]`` tensor, ``(x / 255 - mean) / std``."""
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)
    return tensor.sub(IMAGENET_MEAN[:, None, None]).div(IMAGENET_STD[:, None, None])


def resize(image, size):
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.BILINEAR)


def random_crop(image, size, rng):
    """A ``size`` square at a random place; images smaller than that are resized up first."""
    w, h = image.size
    if w < size or h < size:
        return resize(image, size)
    left = int(rng.integers(0, w - size + 1))
    top = int(rng.integers(0, h - size + 1))
    return image.crop((left, top, left + size, top + size))


def center_crop(image, size):
    w, h = image.size
    if w < size or h < size:
        return resize(image, size)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def perspective_coefficients(dst, src):
    """Coefficients for PIL's PERSPECTIVE transform mapping output points ``dst`` to input
    points ``src`` (four (x, y) pairs each): solve the 8x8 linear system of the homography."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))


def random_perspective(image, rng, distortion=0.5):
    # Each corner moves inwards by up to ``distortion`` of the half size, as torchvision does.
    w, h = image.size
    dx, dy = int(distortion * w / 2), int(distortion * h / 2)
    corners = [(0, 0), (w - 1, 0), (w - 1, h - 1), (0, h - 1)]
    signs = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    moved = [(x + sx * int(rng.integers(0, dx + 1)), y + sy * int(rng.integers(0, dy + 1)))
             for (x, y), (sx, sy) in zip(corners, signs)]
    coeffs = perspective_coefficients(moved, corners)
    return image.transform((w, h), Image.PERSPECTIVE, tuple(coeffs), Image.BILINEAR)


class TrainTransform:
    """Fit to ``size`` (resize, or crop for ``light``), then the chosen augmentation."""

    def __init__(self, size, augment):
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.size, self.augment = size, augment

    def __call__(self, image, rng):
        if self.augment == "light":
            image = random_crop(image, self.size, rng)
        else:
            image = resize(image, self.size)
        if self.augment != "none" and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.augment == "published":
            angle = rng.uniform(-10.0, 10.0)
            image = image.rotate(angle, resample=Image.NEAREST)
            if rng.random() < 0.5:
                image = random_perspective(image, rng)
        return to_normalized_tensor(image)


class EvalTransform:
    """Deterministic counterpart: ``fit`` is "resize", "crop" (centre) or None (native size)."""

    def __init__(self, size=None, fit="resize"):
        self.size, self.fit = size, fit

    def __call__(self, image, rng=None):
        if self.size is not None:
            image = center_crop(image, self.size) if self.fit == "crop" else resize(image,
                                                                                     self.size)
        return to_normalized_tensor(image)


def validation_transform(size, augment):
    """What training-time validation sees: the training geometry without the randomness."""
    return EvalTransform(size, "crop" if augment == "light" else "resize")
