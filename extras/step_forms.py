"""The U-Net's up- and down-sampling step in other forms, for speed: train.py --upsample matmul and
--pool reshape (unet.build_unet(upsample="matmul", pool="reshape")) bring this module in; the
default layers (Conv2DTranspose, MaxPooling2D) never import it.

Each form is the default layer's function written another way: same outputs and gradients for the
same weights (tests/test_step_forms.py). Why: XLA lowers Conv2DTranspose's weight gradient to a
whole-image dilated convolution, a known slow path on GPUs (jax-ml/jax#31662), and MaxPooling2D's
gradient to a select-and-scatter (atomic scatter on a GPU). Both forms use built-in Keras layers and
ops only, so their .keras files still load in a bare session. They need a fixed input size.
"""
from keras import layers, ops


def matmul_up(x, filters, name):
    """The 2x2 stride-2 transposed convolution as what it is: the kernel never overlaps, so each
    input pixel becomes its own 2x2 output block, one matmul (channels -> 4 x filters) and a pixel
    shuffle. Same parameter count; its weight gradient is a plain matmul."""
    h, w = fixed_hw(x, "upsample 'matmul'")
    # channel (dy * 2 + dx) * filters + f, then rows (dy, dx * filters + f), then interleaved
    # (h, dy, w, dx * filters + f), then the 2x2 blocks laid out as pixels
    x = layers.Dense(4 * filters, name=f"{name}_up")(x)
    x = layers.Reshape((h, w, 2, 2 * filters), name=f"{name}_rows")(x)
    x = layers.Permute((1, 3, 2, 4), name=f"{name}_interleave")(x)
    return layers.Reshape((2 * h, 2 * w, filters), name=f"{name}_shuffle")(x)


def reshape_pool(x):
    """The maximum of each 2x2 block, as a reshape + max: MaxPooling2D's outputs, and a gradient
    that is elementwise."""
    h, w = fixed_hw(x, "pool 'reshape'")
    blocks = ops.reshape(x, (-1, h // 2, 2, w // 2, 2, x.shape[-1]))
    return ops.max(blocks, axis=(2, 4))


def fixed_hw(x, what):
    h, w = x.shape[1], x.shape[2]
    if h is None or w is None:
        raise ValueError(f"{what} needs a fixed size "
                         "(size=None accepts any size only with the default layers)")
    return h, w
