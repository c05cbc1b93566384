"""extras/device_augment.py: the keras.ops warp against Pillow's on the same draws, its switched-off
parts, and its determinism per (seed, epoch, batch). (Moved here from test_data.py with the warp.)"""
import numpy as np
from conftest import FAST
from hypothesis import given, strategies as st

import common
import data
from extras import device_augment, synthetic


@st.composite
def photo_batches(draw):
    """A batch of photo-like images (smooth colour fields with a lesion and its mask) and a seed."""
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(24, 72)), draw(st.integers(24, 72))
    seed = draw(st.integers(0, 2**32 - 1))
    images, masks = synthetic.make_synthetic(n, seed=seed % 1000, size_wh=(w, h))
    return images, masks.astype(np.uint8), seed


def device_warp(images, masks, colour, affine):
    """device_augment.warp_device on this process's Keras backend, as NumPy."""
    from keras import ops

    x, y = device_augment.warp_device(images, masks[..., None], colour, affine)
    return ops.convert_to_numpy(x), ops.convert_to_numpy(y)[..., 0]


def iou(a, b):
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


@FAST
@given(batch=photo_batches())
def test_device_warp_matches_pillow_on_the_same_draws(batch):
    images, masks, seed = batch
    colour, affine = data.augment_params(images.shape[:3], data.mean_luma(images), np.random.default_rng(seed))
    xp, yp = data.warp_pillow(images, masks, colour, affine)
    xd, yd = device_warp(images, masks, colour, affine)
    assert xd.dtype == np.uint8 and xd.shape == images.shape and yd.dtype == np.uint8 and yd.shape == masks.shape
    diff = np.abs(xd.astype(int) - xp)
    assert (diff <= 1).mean() >= 0.999, (diff.max(), (diff > 1).mean())
    assert iou(yd.astype(bool), yp.astype(bool)) >= 0.999
    assert set(np.unique(yd)) <= {0, 1}


@FAST
@given(batch=photo_batches(), photometric=st.booleans())
def test_device_warp_switched_off_parts_are_the_identity(batch, photometric):
    images, masks, seed = batch
    colour, affine = data.augment_params(images.shape[:3], data.mean_luma(images), np.random.default_rng(seed),
                                            geometric=False, photometric=photometric)
    x, y = device_warp(images, masks, colour, affine)
    assert np.array_equal(y, masks)  # no geometry: the mask is untouched, to the pixel
    if not photometric:
        assert np.array_equal(x, images)
    else:  # colour only: each pixel's new value depends on that pixel alone, as in Pillow
        assert np.abs(x.astype(int) - data.warp_pillow(images, masks, colour, affine)[0]).max() <= 1


def test_device_warp_is_deterministic_for_a_seed_epoch_and_batch():
    common.import_keras()
    from keras import ops

    images, masks = synthetic.make_synthetic(12, seed=0, size_wh=(48, 48))
    stream = data.Batches(images, masks.astype(np.uint8), 4, seed=5, epoch=3, drop_remainder=True)
    again = data.Batches(images, masks.astype(np.uint8), 4, seed=5, epoch=3, drop_remainder=True)
    warp = device_augment.compiled(device_augment.warp_device)
    for i in range(len(stream)):
        a, b = stream.draw(i), again.draw(i)
        assert all(np.array_equal(u, v) for u, v in zip(a, b))
        one, two = [ops.convert_to_numpy(t) for t in warp(*a)], [ops.convert_to_numpy(t) for t in warp(*b)]
        assert all(u.tobytes() == v.tobytes() for u, v in zip(one, two))  # identical bits
        # Batches[i] (the host path) is the same draws, warped by Pillow.
        x, y = stream[i]
        assert np.array_equal(y, one[1]) and np.abs(x.astype(int) - one[0]).max() <= 1
    other = data.Batches(images, masks.astype(np.uint8), 4, seed=5, epoch=4, drop_remainder=True)
    assert not np.array_equal(other.draw(0)[3], stream.draw(0)[3])  # another epoch, other draws
