"""--init FILE: start a run from the weights of another .keras (pre-train on one set, fine-tune on
another), with a fresh optimizer and schedule.

train.py checks that the file exists with the other flags, and names this module only with
--init, to load the weights into the new model at epoch 0 (a resumed run reads last.keras
instead). docs/training.md.
"""
import common


def load_weights(model, path):
    """The weights of the .keras at `path` into `model`, which must have the same shape (--size,
    --filters, --depth, --encoder); one line (exit 2) where they do not fit."""
    import keras
    try:
        model.set_weights(keras.models.load_model(path, compile=False).get_weights())
    except Exception as e:
        raise common.Error(f"--init {path}",
                           f"cannot start from its weights ({common.one_line(e)})") from None
