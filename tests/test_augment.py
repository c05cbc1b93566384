"""extras/augment.py: host augmentation keeps image and mask aligned, its photometric part touches
colour only, and a seed gives the same augmentation. (Moved here from test_data.py with the code.)"""
import numpy as np
from conftest import FAST
from hypothesis import given, strategies as st

import data
from extras import synthetic


def blob(h, w, cy=0.5, cx=0.5, ry=0.3, rx=0.3):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy * h) / (ry * h)) ** 2 + ((xx - cx * w) / (rx * w)) ** 2 < 1


# -----------------------------------------------------------------------------
# host augmentation (data.Batches with augment=True)

@st.composite
def mask_batches(draw):
    n, s = draw(st.integers(1, 4)), draw(st.integers(8, 48))
    masks = np.stack([blob(s, s, draw(st.floats(0.3, 0.7)), draw(st.floats(0.3, 0.7)),
                           draw(st.floats(0.1, 0.3)), draw(st.floats(0.1, 0.3))) for _ in range(n)])
    return masks, draw(st.integers(0, 2**32 - 1))


@FAST
@given(batch=mask_batches())
def test_augment_keeps_image_and_mask_aligned(batch):
    masks, seed = batch
    images = np.repeat(masks[..., None], 3, axis=3).astype(np.uint8) * 255  # image made FROM the mask
    x, y = data.augment_batch(images, masks, np.random.default_rng(seed), photometric=False)
    assert np.array_equal(x[..., 0] > 127, y)  # geometry is identical, to the pixel
    x, y = data.augment_batch(images, masks.astype(np.uint8), np.random.default_rng(seed))
    assert x.shape == images.shape and x.dtype == np.uint8
    assert y.shape == masks.shape and y.dtype == np.uint8 and set(np.unique(y)) <= {0, 1}
    for xi, yi in zip(x.mean(axis=3), y.astype(bool)):
        if yi.any() and (~yi).any():  # colour jitter is monotone on gray: still separable
            assert xi[yi].min() > xi[~yi].max() - 1e-6 or np.mean(
                (xi > (xi[yi].mean() + xi[~yi].mean()) / 2) != yi) < 0.01


@FAST
@given(seed=st.integers(0, 2**32 - 1))
def test_augment_photometric_only_touches_colour(seed):
    rng = np.random.default_rng(seed)
    gray = rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    images = np.repeat(gray, 3, axis=3)
    masks = rng.random((3, 16, 16)) > 0.5
    x, y = data.augment_batch(images, masks, np.random.default_rng(seed), geometric=False)
    assert np.array_equal(y, masks) and y.dtype == bool
    # hue and saturation act on chroma only: gray pixels stay gray (up to rounding)
    assert np.abs(x.astype(int) - x[..., :1]).max() <= 1
    assert np.abs(x.astype(int) - images).mean() < 60


def test_augment_is_reproducible_and_varies():
    images, masks = synthetic.make_synthetic(4, seed=0, size_wh=(64, 64))
    a = data.augment_batch(images, masks, np.random.default_rng(7))
    b = data.augment_batch(images, masks, np.random.default_rng(7))
    c = data.augment_batch(images, masks, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
