"""The built-in synthetic dermoscopy set: the data of every command run without --data (the quick
start), and what the tests and the web app's examples are made of. Each image is a pure function of
(seed, index): skin tone and texture, a lesion with an irregular Fourier boundary, vignetting,
hairs, ruler marks and bubbles. The layout a set is written in is layouts.py's (write_synthetic);
layouts.data_folders names this module at one line when no --data names a folder, for
synthetic_dir, the set kept under the cache folder. Imports nothing of the project but common.
"""
import contextlib
import os
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import common


def _smooth_noise(rng, h, w, cells):
    """Smooth random field in [-1, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.random((max(2, cells * h // w), cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC))
    return 2 * (field - field.min()) / max(float(np.ptp(field)), 1e-6) - 1


def _synthetic_one(rng, w, h):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Skin: a random tone with blotchy low-frequency texture and fine grain.
    skin = np.array([rng.uniform(195, 240), rng.uniform(145, 195), rng.uniform(120, 170)],
                    np.float32)
    texture = 14 * _smooth_noise(rng, h, w, 6) + 5 * _smooth_noise(rng, h, w, 40)
    image = skin + texture[..., None] * np.array([1.0, 0.9, 0.8], np.float32)

    # Lesion: a radius modulated by a few random Fourier harmonics gives an irregular boundary.
    harmonics = np.arange(2, 7)
    amps = rng.uniform(0, 0.22, len(harmonics)) / np.sqrt(harmonics)
    phases = rng.uniform(0, 2 * np.pi, len(harmonics))
    stretch = 1 + amps.sum()  # the largest the radius can get, relative to r0
    r0 = rng.uniform(0.14, 0.34) * min(h, w) / stretch * 1.3
    pad = max(1.0, 0.02 * min(h, w))  # background all round: the lesion lies inside the image
    r0 = min(r0, (0.5 * min(h, w) - pad - 0.5) / stretch)
    margin = r0 * stretch + pad
    cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
    angle = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(xx - cx, yy - cy)
    waves = np.cos(harmonics[:, None, None] * angle + phases[:, None, None])
    radius = r0 * (1 + np.tensordot(amps, waves, 1))
    mask = dist < radius
    # Colour: dark brown core fading to light brown at the rim, with blotches (internal variation).
    brown = np.array([1.0, rng.uniform(0.5, 0.65), rng.uniform(0.35, 0.5)], np.float32)
    dark, light = rng.uniform(45, 100) * brown, rng.uniform(130, 180) * brown
    t = np.clip(dist / radius + 0.35 * _smooth_noise(rng, h, w, 10), 0, 1)[..., None]
    lesion = dark + (light - dark) * t
    alpha = np.clip((radius - dist) / rng.uniform(1.5, 5) + 0.5, 0, 1)[..., None]  # soft edge
    image = image * (1 - alpha) + lesion * alpha

    # Vignetting: dermatoscope optics darken the corners.
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    image *= (1 - rng.uniform(0.1, 0.45) * r2 / 2)[..., None]
    image += rng.normal(0, 3, image.shape).astype(np.float32)

    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(0, 9)):  # hairs: thin dark quadratic curves
        p0, p1, p2 = (rng.uniform([-0.1 * w, -0.1 * h], [1.1 * w, 1.1 * h]) for _ in range(3))
        s = np.linspace(0, 1, 24)[:, None]
        curve = (1 - s) ** 2 * p0 + 2 * s * (1 - s) * p1 + s ** 2 * p2
        shade = int(rng.uniform(10, 70))
        draw.line([tuple(p) for p in curve], fill=(shade, int(shade / 1.3), int(shade / 1.6)),
                  width=int(rng.integers(1, 3)), joint="curve")
    if rng.random() < 0.3:  # ruler marks along one edge
        y = int(rng.choice([rng.uniform(4, 12), rng.uniform(h - 12, h - 4)]))
        for x in range(int(rng.uniform(5, 20)), w - 5, int(rng.integers(7, 12))):
            draw.line([(x, y), (x, y + (6 if x % 5 == 0 else 3))], fill=(20, 20, 20), width=1)
    for _ in range(rng.integers(0, 4) if rng.random() < 0.4 else 0):  # air bubbles
        bx, by, br = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 18)
        draw.ellipse([bx - br, by - br, bx + br, by + br], outline=(245, 245, 240), width=1)
    pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    return np.asarray(pil), mask


def make_synthetic(count, seed=0, size_wh=(384, 288)):
    """(uint8 images (N, H, W, 3), bool masks (N, H, W)); image i depends only on (seed, i)."""
    w, h = size_wh
    images = np.zeros((count, h, w, 3), np.uint8)
    masks = np.zeros((count, h, w), bool)
    for i in range(count):
        images[i], masks[i] = _synthetic_one(np.random.default_rng([seed, i]), w, h)
    return images, masks


def write_pairs(image_dir, mask_dir, count, seed=0, size_wh=(384, 288)):
    """Images i = 0 .. count - 1 as ISIC_<i>.jpg in image_dir, their masks as
    ISIC_<i>_segmentation.png (0/255) in mask_dir."""
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    for i in range(count):
        image, mask = _synthetic_one(np.random.default_rng([seed, i]), *size_wh)
        name = f"ISIC_{i:07d}"
        common.atomic_write(os.path.join(image_dir, name + ".jpg"),
                            lambda f: Image.fromarray(image).save(f, "JPEG", quality=92))
        common.atomic_write(os.path.join(mask_dir, name + "_segmentation.png"),
                            lambda f: Image.fromarray(mask.astype(np.uint8) * 255).save(f, "PNG"))


def synthetic_dir(write, count=200, seed=0, cache=None):
    """Path of the built-in synthetic set, written once under the cache folder by write(folder,
    count, seed) (layouts.write_synthetic): into a temp folder first, then renamed, so an
    interrupted run never leaves half a data set behind. ("v2": the name it has had since the
    array cache's version 2, kept so that an existing set is reused.)"""
    base = common.cache_dir(cache)
    path = os.path.join(base, f"synthetic-v2-{count}-seed{seed}-384x288")
    if not os.path.isdir(path):
        os.makedirs(base, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=base, prefix=".tmp-synthetic-",
                                         ignore_cleanup_errors=True) as tmp:
            write(tmp, count, seed)
            with contextlib.suppress(OSError):  # another process may have won the race
                os.rename(tmp, path)
        if not os.path.isdir(path):
            raise common.Error(path, "the synthetic set could not be written")
    return path
