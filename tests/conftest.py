"""Shared pytest settings, fixtures and helpers: the other test files import FAST, MANY, TINY and
run_cli / free_port from here (`from conftest import ...`) and use the fixtures by name; keep them stable."""
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import data  # noqa: E402  (needs the path above)
import layouts  # noqa: E402

# Hypothesis: FAST for properties whose examples cost real work (images, files), MANY for cheap
# arithmetic checked against a reference (the metrics against the official scorer).
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# train.py flags for a run of seconds: 32 px, base 4, depth 2.
TINY = ["--size", "32", "--filters", "4", "--depth", "2", "--batch", "4", "--workers", "2"]


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server or a cluster a test starts)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_9_after_rows(cmd, csv_path, rows, timeout=120):
    """Start cmd, SIGKILL it as soon as csv_path holds at least `rows` data rows (or after
    `timeout` s); the rows it had then. Nothing outlives the call."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    seen, deadline = 0, time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:  # wait for real progress, then kill
            if os.path.exists(csv_path):
                with open(csv_path) as f:
                    seen = sum(1 for _ in f) - 1
                if seen >= rows:
                    break
            time.sleep(0.005)
    finally:  # killed here whether or not the wait saw progress
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    return seen


def run_cli(module, argv, capsys):
    """(exit code, stdout, stderr) of module.main(argv) run in-process; never a traceback."""
    code = module.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Point the data cache at a per-session temp folder so tests never touch ~/.cache."""
    monkeypatch.setenv("SKIN_UNET_CACHE", str(tmp_path_factory.getbasetemp() / "skin-unet-cache"))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A tiny synthetic set: 24 pairs of 128x96 images in the ISIC 2018 layout (Training only,
    so find_pairs splits it by hash: 20 train, 1 val, 3 test)."""
    root = tmp_path_factory.mktemp("synthetic")
    layouts.write_synthetic(str(root), count=24, seed=0, size_wh=(128, 96))
    return str(root)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """One untrained 32-px U-Net (base 4, depth 2; shapes, not skill, are what these tests need) in
    every format the predictors read, converted once for the whole suite: {"keras", "saved_model",
    "tflite" (float32), "int8" (uint8 in and out)} paths, with 3 images and Keras's probabilities."""
    import unet
    tf = pytest.importorskip("tensorflow")
    folder = tmp_path_factory.mktemp("tiny_model")
    # Seeded: an untrained net's int8 error depends on its draw (max 0.009-0.065 over seeds), and
    # an unseeded one made the int8 parity bound flaky.
    common.import_keras().utils.set_random_seed(0)
    model = unet.build_unet(size=32, filters=4, depth=2)
    paths = {"keras": str(folder / "tiny.keras"), "saved_model": str(folder / "saved_model"),
             "tflite": str(folder / "tiny.tflite"), "int8": str(folder / "tiny_int8.tflite")}
    model.save(paths["keras"])
    model.export(paths["saved_model"], verbose=False)
    with open(paths["tflite"], "wb") as f:
        f.write(tf.lite.TFLiteConverter.from_saved_model(paths["saved_model"]).convert())
    rng = np.random.default_rng(0)
    converter = tf.lite.TFLiteConverter.from_saved_model(paths["saved_model"])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: (
        [rng.uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)] for _ in range(8))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.uint8
    with open(paths["int8"], "wb") as f:
        f.write(converter.convert())
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    return {"paths": paths, "images": images,
            "expected": model.predict_on_batch(images.astype(np.float32))[..., 0]}


@pytest.fixture(scope="session")
def train_unet(synthetic_data):
    """train_unet(size, filters, depth) -> a small U-Net fitted 15 epochs on the synthetic fixture's
    training split: enough for confident, non-trivial masks (not coin flips), in seconds."""
    def train(size, filters, depth, **forms):  # forms: build_unet's upsample= / pool=
        import unet

        keras = common.import_keras()
        keras.utils.set_random_seed(0)
        split = data.load_split(synthetic_data, "train", size, progress=False)
        model = unet.build_unet(size=size, filters=filters, depth=depth, **forms)
        unet.compile_model(model, lr=3e-3, jit_compile=False)
        model.fit(split.images.astype(np.float32), split.masks[..., None].astype(np.float32),
                  batch_size=4, epochs=15, verbose=0)
        return model
    return train
