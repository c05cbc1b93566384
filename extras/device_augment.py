"""Augmentation's pixel work on the accelerator: `train.py --augment-on device` (the default on a
GPU or TPU, where Pillow threads cannot keep up: docs/training.md).

The random draws are data.py's (augment_params), the same as the host path's; only the pixel work
moves from Pillow (data.warp_pillow) to keras.ops, compiled for the device. The feed's threads
then only gather and draw (data.Batches.draw), and fit takes the device arrays the warp returns as
they are. The ranges have one definition, in data.py.
"""


def warp_device(images, masks, colour, affine):
    """data.warp_pillow in keras.ops: the same draws give the same pixels to within one grey
    level (float32 here, double in Pillow) and the same masks. images uint8 (B, H, W, 3), masks
    (B, H, W, 1) 0/1, colour (B, 12), affine (B, 6); returns uint8 images and masks, as the host
    path does. Pillow's arithmetic, step by step: the colour matrix rounds half up and clips; the
    affine maps each output pixel centre to an input point; a point outside the image gives black
    (and background); inside, bilinear between the 4 nearest pixel centres (clamped at the edges),
    truncated to an integer. The mask is a 4th band of the same warp, then > 127. Gathers only
    (take / floor / clip / where): no scatter, and no keras image op, whose affine goes through a
    slow map_coordinates on JAX."""
    from keras import ops

    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    m = ops.reshape(ops.cast(colour, "float32"), (-1, 3, 4))
    rgb = ops.einsum("bhwc,bdc->bhwd", ops.cast(images, "float32"), m[:, :, :3])
    rgb = ops.clip(ops.floor(rgb + m[:, None, None, :, 3] + 0.5), 0.0, 255.0)
    mask = ops.cast(ops.reshape(masks, (-1, h, w, 1)), "float32") * 255.0
    bands = ops.concatenate([rgb, mask], axis=-1)

    a = ops.cast(affine, "float32")[:, :, None, None]  # (B, 6, 1, 1) against the (H, W) grid
    ys, xs = ops.meshgrid(ops.arange(h, dtype="float32") + 0.5,
                          ops.arange(w, dtype="float32") + 0.5, indexing="ij")
    sx = a[:, 0] * xs + a[:, 1] * ys + a[:, 2]  # (B, H, W)
    sy = a[:, 3] * xs + a[:, 4] * ys + a[:, 5]
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    sx, sy = sx - 0.5, sy - 0.5
    x0, y0 = ops.floor(sx), ops.floor(sy)
    dx, dy = (sx - x0)[..., None], (sy - y0)[..., None]
    flat = ops.reshape(bands, (-1, 4))
    row = ops.reshape(ops.arange(n, dtype="int32") * (h * w), (-1, 1, 1))

    def pixel(yy, xx):  # (B, H, W, 4): the input pixels at (clamped) rows yy, columns xx
        yy = ops.cast(ops.clip(yy, 0, h - 1), "int32")
        xx = ops.cast(ops.clip(xx, 0, w - 1), "int32")
        index = ops.reshape(row + yy * w + xx, (-1,))
        return ops.reshape(ops.take(flat, index, axis=0), (-1, h, w, 4))

    p00, p01 = pixel(y0, x0), pixel(y0, x0 + 1)
    p10, p11 = pixel(y0 + 1, x0), pixel(y0 + 1, x0 + 1)
    top, bottom = p00 + (p01 - p00) * dx, p10 + (p11 - p10) * dx
    out = ops.where(inside[..., None], ops.floor(top + (bottom - top) * dy), 0.0)
    return ops.cast(out[..., :3], "uint8"), ops.cast(out[..., 3:] > 127.0, "uint8")


def compiled(fn):
    """fn (keras.ops code) compiled by the backend's own compiler: jax.jit, or tf.function with XLA;
    torch runs it eagerly. A new input shape compiles again, so callers keep the shape fixed."""
    import keras
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf  # TF backend only
        return tf.function(fn, jit_compile=True)
    return fn


def device_warp(batches):
    """warp_device compiled for the accelerator, and run once on a batch of this shape before fit
    (so the first epoch's speed does not include the compile)."""
    import keras
    warp = compiled(warp_device)
    x, y, colour, affine = batches.draw(0)
    keras.ops.convert_to_numpy(warp(x, y, colour, affine)[1])
    return warp


def device_batches(batches):
    """The feed's device path for data.feed: batch `index` drawn on the host (a gather and a
    few hundred numbers) and warped on the accelerator."""
    warp = device_warp(batches)
    return lambda index: warp(*batches.draw(index))
