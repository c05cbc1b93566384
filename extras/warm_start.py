"""--init FILE: start a run from the weights of another .keras (pre-train on one set, fine-tune on
another), with a fresh optimizer and schedule.

train.py imports it only with --init: check() before anything runs, load_weights() into the new
model at epoch 0 (a resumed run reads last.keras instead). docs/training.md.
"""
import os

import common


def check(path):
    """--init's file as an absolute path; one line (exit 2) if there is none."""
    if not os.path.isfile(path):
        raise common.Error(f"--init {path}", "file not found")
    return os.path.abspath(path)


def load_weights(model, path):
    """The weights of the .keras at `path` into `model`, which must have the same shape (--size,
    --filters, --depth, --encoder); one line (exit 2) where they do not fit."""
    import keras
    try:
        model.set_weights(keras.models.load_model(path, compile=False).get_weights())
    except Exception as e:
        raise common.Error(f"--init {path}",
                           f"cannot start from its weights ({common.one_line(e)})") from None
