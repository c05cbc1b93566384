"""--loss bce_lovasz: BCE plus the Lovász loss (Berman et al., CVPR 2018), the per-image Jaccard
itself made differentiable. train.py hands bce_lovasz to unet.compile_model in place of a loss name
when --loss asks for it; the default loss (bce_dice) never imports this module.

Registered under the project's package, so a model saved with it names "skin_unet>bce_lovasz";
loading such a model with compile=True needs `import extras.lovasz` (with compile=False, as every
command loads, nothing).
"""
import keras
from keras import ops

import unet


def lovasz(y_true, y_pred):
    """Per-image Lovász loss: the tight convex extension of 1 - Jaccard to probabilities, applied
    to the pixel errors |truth - p|. On hard 0/1 predictions it equals 1 - iou_per_image exactly,
    so it optimises the challenge's own per-image score, not its Dice proxy."""
    t, p, _ = unet.per_image(y_true, y_pred)
    t = ops.reshape(ops.cast(t > 0.5, "float32"), (ops.shape(t)[0], -1))
    errors = ops.abs(t - ops.reshape(p, ops.shape(t)))
    order = ops.argsort(-errors, axis=-1)  # largest error first
    errors = ops.take_along_axis(errors, order, axis=-1)
    truth = ops.take_along_axis(t, order, axis=-1)
    # Jaccard loss of the k largest errors taken as mistakes, for every k; union >= 1 always.
    lesion = ops.sum(truth, axis=-1, keepdims=True)
    missed = lesion - ops.cumsum(truth, axis=-1)
    jaccard = 1.0 - missed / (lesion + ops.cumsum(1.0 - truth, axis=-1))
    steps = ops.concatenate([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], axis=-1)
    return ops.sum(errors * steps, axis=-1)


@keras.saving.register_keras_serializable(package=unet.PACKAGE)
def bce_lovasz(y_true, y_pred):
    """BCE (every pixel gets a gradient) + Lovász (the per-image Jaccard itself)."""
    return unet.bce(y_true, y_pred) + lovasz(y_true, y_pred)
