"""Augmentation on the host: random flips, turns, small rotations, zoom and shift, and colour
jitter, drawn with NumPy and applied with Pillow. On unless --no-augment: data.Batches brings this
module in when augment=True, so it is on the default training path, kept here as one piece with a
narrow interface (mean_luma, augment_params, warp_pillow). extras/device_augment.py does the same
pixel work on the accelerator from the same draws. docs/data.md#augment-and-feed.
"""
import numpy as np
from PIL import Image

import data

# The ranges, the one definition both augmentation paths use (the draws below are shared, only
# the pixel work differs: Pillow on the host, keras.ops on the accelerator).
ROTATION_DEG = 15           # small rotation, +-, on top of a random flip and 90-degree turn
SCALE = (0.9, 1.1)          # zoom, drawn log-uniformly
SHIFT = 0.06                # translation, +- this fraction of the width / height
HUE_DEG = 10                # +-
SATURATION = (0.8, 1.2)
BRIGHTNESS = (0.85, 1.15)
CONTRAST = (0.8, 1.2)       # around the image's mean luma

# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane, saturation a scaling of it, and Y
# (luma) is left alone, so one 3x3 matrix per image does hue + saturation + brightness.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                       [0.596, -0.274, -0.322],
                       [0.211, -0.523, 0.312]], np.float32)
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ).astype(np.float32)


def _affine(rng, h, w):
    """Pillow AFFINE coefficients (output pixel -> input pixel) of a random flip, 90-degree
    rotation, small rotation, scale and shift, about the centre."""
    flip = np.diag([-1.0 if rng.random() < 0.5 else 1.0, 1.0])
    k = rng.integers(0, 4)
    rot90 = np.array([[0.0, -1.0], [1.0, 0.0]]) if k % 2 else np.eye(2)
    rot90 = rot90 * (-1.0 if k >= 2 else 1.0)
    a = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    scale = np.exp(rng.uniform(*np.log(SCALE)))
    small = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * scale
    forward = small @ rot90 @ flip  # input -> output about the centre
    shift = rng.uniform(-SHIFT, SHIFT, 2) * (w, h)
    inv = np.linalg.inv(forward)
    centre = np.array([w / 2, h / 2])
    offset = centre - inv @ (centre + shift)
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


def mean_luma(images):
    """Mean luma (Y of YIQ) of each image, from every 4th pixel in each direction: contrast's
    centre. Batches works it out once per image. numpy reduces the strided view in buffered
    pieces, so no whole-set temporary is made (sums of uint8 in float64 are exact)."""
    return images[:, ::4, ::4].mean(axis=(1, 2)) @ RGB_TO_YIQ[0]


def _colour(rng, luma):
    """Per-image colour jitter as Pillow convert() matrices (12 numbers: 3x3 + offset): hue,
    saturation, brightness, and contrast around the image's mean luma. Hue and saturation act on
    the chroma plane of YIQ only, so gray stays gray."""
    n = len(luma)
    hue = np.deg2rad(rng.uniform(-HUE_DEG, HUE_DEG, n))
    sat = rng.uniform(*SATURATION, n)
    bright, contrast = rng.uniform(*BRIGHTNESS, n), rng.uniform(*CONTRAST, n)
    chroma = np.zeros((n, 3, 3), np.float32)
    chroma[:, 0, 0] = 1
    chroma[:, 1, 1], chroma[:, 1, 2] = sat * np.cos(hue), -sat * np.sin(hue)
    chroma[:, 2, 1], chroma[:, 2, 2] = sat * np.sin(hue), sat * np.cos(hue)
    matrix = (bright * contrast)[:, None, None] * (YIQ_TO_RGB @ chroma @ RGB_TO_YIQ)
    offset = np.repeat(((1 - contrast) * bright * luma)[:, None, None], 3, axis=1)
    return np.concatenate([matrix, offset], axis=2).reshape(n, 12)


def augment_params(shape, luma, rng, geometric=True, photometric=True):
    """The random draws of a batch of `shape` (B, H, W) whose images have mean_luma `luma`: (colour
    (B, 12) float32 convert() matrices, affine (B, 6) float64 AFFINE coefficients); a part switched
    off is the identity. Drawn in the same order since the first release, so a seed gives the same
    augmentation as it always has."""
    n, h, w = shape
    if photometric:
        colour = _colour(rng, luma).astype(np.float32)
    else:
        colour = np.tile(data.NO_COLOUR, (n, 1))
    if geometric:
        affine = np.array([_affine(rng, h, w) for _ in range(n)])
    else:
        affine = np.tile(data.NO_AFFINE, (n, 1))
    return colour, affine.reshape(n, 6)


def augment_batch(images, masks, rng, geometric=True, photometric=True):
    """Augment a batch on the host: colour jitter on the images only, then the same random affine
    on each image and its mask, so masks stay binary (bilinear on 0/255, then > 127) and aligned.
    images uint8 (B, H, W, 3), masks bool or 0/1 (B, H, W); returns new arrays, same dtypes."""
    images = np.asarray(images, np.uint8)
    luma = mean_luma(images) if photometric else None
    params = augment_params(images.shape[:3], luma, rng, geometric, photometric)
    return warp_pillow(images, masks, *params)


def warp_pillow(images, masks, colour, affine):
    """augment_batch's pixel work, given its draws: two Pillow C calls per image. They release
    the GIL, but the Python around them does not, so worker threads stop scaling after a few
    (docs/benchmarks.md): extras/device_augment.py is the accelerator's path."""
    masks = np.asarray(masks)
    n, h, w = masks.shape
    masks255 = np.where(masks > 0, np.uint8(255), np.uint8(0))
    out_images, out_masks = np.empty_like(images), np.empty((n, h, w), np.uint8)
    for i in range(n):
        rgb = Image.fromarray(images[i])
        if not np.array_equal(colour[i], data.NO_COLOUR):
            rgb = rgb.convert("RGB", tuple(colour[i]))
        # The mask rides along as a 4th band, so one resampling pass moves image and mask with
        # identical geometry. "CMYK" is just Pillow's plain 4 x 8-bit mode here; RGBA would
        # premultiply the colours by the mask.
        pil = Image.merge("CMYK", [*rgb.split(), Image.fromarray(masks255[i])])
        if not np.array_equal(affine[i], data.NO_AFFINE):
            pil = pil.transform((w, h), Image.AFFINE, tuple(affine[i]), Image.BILINEAR)
        *bands, mask = pil.split()
        out_images[i], out_masks[i] = np.asarray(Image.merge("RGB", bands)), np.asarray(mask)
    return out_images, (out_masks > 127).astype(masks.dtype)

