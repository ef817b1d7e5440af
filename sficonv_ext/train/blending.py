"""Self-blended fakes (after Self-Blended Images, Shiohara and Yamasaki, CVPR 2022).

A copy of a real crop is altered in colour and frequency content, shifted by a pixel or two and
blended back into the crop through a soft random mask. The result carries the traces a face swap
leaves (a blending boundary, a region with different colour statistics and resampling history)
without any generative model. All randomness comes from the ``rng`` passed in.
"""
import numpy as np
from PIL import Image
from scipy import ndimage


def _colour_shift(img, rng):
    # Per-channel gain and offset, then a saturation change around the luminance.
    gain = rng.uniform(0.85, 1.15, size=3)
    offset = rng.uniform(-0.08, 0.08, size=3)
    out = img * gain + offset
    luma = out @ np.array([0.299, 0.587, 0.114])
    saturation = rng.uniform(0.7, 1.3)
    out = luma[..., None] + saturation * (out - luma[..., None])
    return np.clip(out, 0.0, 1.0)


def _resample(img, rng):
    # Down then up with different filters: the interpolation traces of a warped source face.
    h, w = img.shape[:2]
    scale = rng.uniform(0.4, 0.75)
    small = (max(2, round(w * scale)), max(2, round(h * scale)))
    pil = Image.fromarray(np.round(img * 255).astype(np.uint8))
    pil = pil.resize(small, Image.BILINEAR).resize((w, h), Image.BICUBIC)
    return np.asarray(pil, dtype=np.float64) / 255.0


def _blur(img, rng):
    sigma = rng.uniform(0.6, 1.4)
    return ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="reflect")


def _sharpen(img, rng):
    amount = rng.uniform(0.5, 1.5)
    blurred = ndimage.gaussian_filter(img, sigma=(1.0, 1.0, 0), mode="reflect")
    return np.clip(img + amount * (img - blurred), 0.0, 1.0)


EXTRA_CHANGES = (_blur, _sharpen)


def _shift(img, rng):
    # A small misalignment between source and target, edge pixels repeated.
    dy, dx = rng.integers(-2, 3, size=2)
    return ndimage.shift(img, (dy, dx, 0), order=0, mode="nearest")


def soft_mask(height, width, rng):
    """A blob (an ellipse with a wobbling radius) feathered by a Gaussian, values in [0, 1]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy = height * rng.uniform(0.35, 0.65)
    cx = width * rng.uniform(0.35, 0.65)
    ry = height * rng.uniform(0.2, 0.4)
    rx = width * rng.uniform(0.2, 0.4)
    angle = rng.uniform(0, np.pi)
    y, x = yy - cy, xx - cx
    u = (x * np.cos(angle) + y * np.sin(angle)) / rx
    v = (-x * np.sin(angle) + y * np.cos(angle)) / ry
    theta = np.arctan2(v, u)
    # Radius modulated by a few low harmonics, so masks are not all ellipses.
    wobble = 1.0
    for k in (2, 3, 5):
        wobble = wobble + rng.uniform(-0.12, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    inside = (np.sqrt(u * u + v * v) <= wobble).astype(np.float64)
    feather = rng.uniform(0.5, 2.5) * min(height, width) / 64.0
    return np.clip(ndimage.gaussian_filter(inside, feather), 0.0, 1.0)


def self_blend(crop, rng):
    """Return a fake made from ``crop`` (float array ``[H, W, 3]`` in [0, 1])."""
    source = _colour_shift(crop, rng)
    # Always resampled, as a warped source face is; sometimes blurred or sharpened as well.
    source = _resample(source, rng)
    if rng.random() < 0.5:
        source = EXTRA_CHANGES[rng.integers(len(EXTRA_CHANGES))](source, rng)
    source = _shift(source, rng)
    mask = soft_mask(crop.shape[0], crop.shape[1], rng)
    # As in SBI, the blend is sometimes partial.
    mask *= rng.choice([0.75, 1.0, 1.0])
    mask = mask[..., None]
    return mask * source + (1.0 - mask) * crop
