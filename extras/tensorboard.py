"""--tensorboard DIR: TensorBoard event files beside log.csv, one set of scalars per epoch.

train.py names this module twice, both behind the flag: config_of checks the packages before Keras
is imported (so a missing one fails in a moment, not mid-run), and train() adds the callback.
"""
import importlib.util
import os

import common


def checked(folder):
    """The folder as an absolute path, once its packages are found; common.Error otherwise."""
    missing = [m for m in ("tensorboard", "tensorflow") if importlib.util.find_spec(m) is None]
    if missing:
        raise common.Error("--tensorboard", f"needs {' and '.join(missing)} (pip install "
                           f"{' '.join(missing)}); TensorFlow writes the event files on every "
                           "Keras backend")
    return os.path.abspath(folder)


def callback(folder):
    """Keras's own callback: scalars once per epoch, no graph, no profiling."""
    import keras
    return keras.callbacks.TensorBoard(folder, histogram_freq=0, write_graph=False,
                                       update_freq="epoch", profile_batch=0)
