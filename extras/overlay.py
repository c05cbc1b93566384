"""The overlay a person looks at: the photo with the lesion tinted and outlined, and, where the
model is unsure, a sparse cyan hatch. predict.py writes <id>_overlay.jpg with it (unless
--no-overlay), at the preview's size; the web app shows it.
"""
import functools
import os

import numpy as np
from PIL import Image

import common
import data

TINT, OUTLINE = (255, 200, 0), (255, 0, 0)  # amber wash and a red border: visible on any skin tone
HATCH = (0, 200, 255)  # cyan: far from the amber and the red, and from any skin tone
# The unsure band: a pixel the model gives at least one chance in four of either answer. A slider
# move of 0.25 from the default 0.5 flips it, so it is the part of the mask a reader should doubt.
UNSURE_LOW, UNSURE_HIGH = 0.25, 0.75
HATCH_EVERY = 8  # px between the hatch's 1-px diagonal lines: 1 pixel in 8 is drawn, the skin shows


def _erode(mask):
    # 4-neighbour erosion; pixels beyond the border count as background, so the frame is an edge.
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                         & mask[1:-1, :-2] & mask[1:-1, 2:])
    return inner


def unsure_band(prob):
    """bool (H, W): the pixels whose probability is within [UNSURE_LOW, UNSURE_HIGH]."""
    prob = np.asarray(prob, np.float32)
    return (prob >= UNSURE_LOW) & (prob <= UNSURE_HIGH)


@functools.lru_cache(maxsize=8)  # photos in bulk share a few preview sizes: made once per size
def hatch_pattern(shape):
    """bool (H, W), read-only: 1-px diagonal lines HATCH_EVERY px apart, from the image's corner."""
    h, w = shape
    pattern = (np.arange(h)[:, None] + np.arange(w)[None, :]) % HATCH_EVERY == 0
    pattern.flags.writeable = False
    return pattern


def draw(image, mask, prob=None, unsure=True):
    """uint8 (H, W, 3): the photo with the lesion tinted (stronger where the model is surer, if
    prob is given) and its boundary drawn. Without the hatch only mask pixels change, so the
    outline never hides the skin around the lesion that a reader compares it with. With prob and
    `unsure`, pixels in the unsure band (inside the mask or not) also get a sparse hatch: a wide
    band is where the mask's edge could as well be elsewhere. The outline goes on top of it."""
    image, mask = np.asarray(image, np.uint8), np.asarray(mask, bool)
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape} and mask {mask.shape} do not match")
    if prob is not None and np.shape(prob) != mask.shape:
        raise ValueError(f"prob {np.shape(prob)} and mask {mask.shape} do not match")
    out = image.copy()
    if prob is None:
        alpha = np.full(mask.shape, 0.4, np.float32)
    else:
        alpha = np.clip(np.asarray(prob, np.float32), 0.0, 1.0) * 0.5
    a = alpha[mask][:, None]
    out[mask] = np.round(image[mask] * (1 - a) + np.asarray(TINT, np.float32) * a).astype(np.uint8)
    if prob is not None and unsure:
        out[unsure_band(prob) & hatch_pattern(tuple(mask.shape))] = HATCH
    # About 3 px on a 1000 px photo: thick enough to see, thin enough not to hide the border.
    inner = mask
    for _ in range(max(1, round(max(mask.shape) / 350))):
        inner = _erode(inner)
    out[mask & ~inner] = OUTLINE
    return out


def write(folder, image_id, preview, small_prob, threshold):
    """<id>_overlay.jpg in folder: the model-size map resized whole (a preview is small)."""
    prob = data.resize_prob(small_prob, preview.shape[:2])
    tinted = Image.fromarray(draw(preview, prob > threshold, prob))
    common.atomic_write(os.path.join(folder, f"{image_id}_overlay.jpg"),
                        lambda f: tinted.save(f, "JPEG", quality=90))
