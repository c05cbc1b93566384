"""The overlay a person looks at: the photo with the lesion tinted and outlined. predict.py writes
<id>_overlay.jpg with it (unless --no-overlay), at the preview's size; the web app shows it.
"""
import os

import numpy as np
from PIL import Image

import common
import data

TINT, OUTLINE = (255, 200, 0), (255, 0, 0)  # amber wash and a red border: visible on any skin tone


def _erode(mask):
    # 4-neighbour erosion; pixels beyond the border count as background, so the frame is an edge.
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                         & mask[1:-1, :-2] & mask[1:-1, 2:])
    return inner


def draw(image, mask, prob=None):
    """uint8 (H, W, 3): the photo with the lesion tinted (stronger where the model is surer, if
    prob is given) and its boundary drawn. Only mask pixels change, so the outline never hides the
    skin around the lesion that a reader compares it with."""
    image, mask = np.asarray(image, np.uint8), np.asarray(mask, bool)
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape} and mask {mask.shape} do not match")
    out = image.copy()
    if prob is None:
        alpha = np.full(mask.shape, 0.4, np.float32)
    else:
        alpha = np.clip(np.asarray(prob, np.float32), 0.0, 1.0) * 0.5
    a = alpha[mask][:, None]
    out[mask] = np.round(image[mask] * (1 - a) + np.asarray(TINT, np.float32) * a).astype(np.uint8)
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
