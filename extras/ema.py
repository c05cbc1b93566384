"""--ema: validate and save the moving average of the weights instead of the trained weights.

unet.compile_model(..., ema=cfg.ema) has Keras's Adam keep the average (use_ema: updated on the
device inside the train step). fit's validation swaps it in through Keras's SwapEMAWeights
callback; this module is imported only with --ema, for the two places fit does not reach:
best.keras (train.save_best) and the per-source validation of several --data (extras/sources.py).
last.keras keeps the trained weights,
with the average in its optimizer state, so a resume continues both (docs/training.md).
"""
import contextlib

import keras


@contextlib.contextmanager
def averaged(model):
    """The optimizer's moving average in the model's weights for the duration, the trained weights
    back afterwards. This drives SwapEMAWeights by hand, the callback fit itself gets for its
    validation: one mechanism wherever the average is validated or saved."""
    swap = keras.callbacks.SwapEMAWeights()
    swap.set_model(model)
    swap.on_test_begin()
    try:
        yield
    finally:
        swap.on_test_end()
