"""Does train.py's real loop keep up with a bare model.fit? Both timed in one process, same model/backend.

    python bench/bench_train.py --data ../shared/data/isic2018 --size 256 --batch 8 --steps 12

(a) train.train(): real JPEGs from the array cache, augmentation threads, uint8 batches, all callbacks
    (checkpoints, CSV log, schedule, early stopping), a short validation each epoch; images/s is its
    log.csv figure (training batches from the 2nd step of the epoch to the end of training).
(b) bare model.fit of the same U-Net with Keras's default compile (XLA off on a CPU-only machine) on
    in-memory uint8 arrays, no callbacks, measured over the same window. The last epoch of each counts
    (the first one pays for compilation).
train.py makes its own XLA decision as a long run would (its probe: a benchmark run is too short to
trigger it otherwise), so on a CPU where XLA loses the ratio shows whether the probe saw that.
Prints both and the ratio (goal >= 0.95). Runs (b), (a), (b), (a) and keeps each one's best epoch,
because on a shared machine the other load changes while it runs.
"""
import argparse
import csv
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from machine import cpu_line  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402


def bare_fit(images, masks, size, batch, filters, epochs, steps):
    import keras

    import unet

    keras.backend.clear_session()
    model = unet.compile_model(unet.build_unet(size, filters))  # jit_compile="auto": Keras's default
    x = images[:steps * batch]
    y = masks[:steps * batch, ..., None].astype(np.float32)

    class Clock(keras.callbacks.Callback):
        rates = []

        def on_epoch_begin(self, epoch, logs=None):
            self.calls = 0

        def on_train_batch_begin(self, batch_index, logs=None):
            self.calls += 1
            if self.calls == 2:
                self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):  # logs are synced by now
            self.rates.append((steps - 1) * batch / (time.perf_counter() - self.t))

    clock = Clock()
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=True, callbacks=[clock], verbose=0)
    return clock.rates[-1]


def train_py(args, out):
    train.XLA_PROBE_MIN_STEPS = 0  # decide XLA as a long run of this shape would
    train.train(["--data", args.data, "--size", str(args.size), "--batch", str(args.batch),
                 "--filters", str(args.filters), "--epochs", str(args.epochs),
                 "--steps-per-epoch", str(args.steps), "--val-fraction", str(args.val_fraction),
                 "--out", out, "--fresh", "--patience", "0", "--verbose", "0"])
    with open(os.path.join(out, "run.json")) as f:
        run = json.load(f)
    print(f"  train.py: jit={run['jit']} ({run['jit_reason']})", flush=True)
    with open(os.path.join(out, "log.csv")) as f:
        return float(list(csv.DictReader(f))[-1]["images_per_sec"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "isic2018"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="training batches per epoch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--val-fraction", type=float, default=0.02, help="small: validation is not what is timed")
    args = p.parse_args()
    args.data = os.path.abspath(args.data)
    if not os.path.isdir(args.data):
        sys.exit(f"error: {args.data}: data folder not found (give --data)")
    print(cpu_line(), flush=True)
    t0 = time.time()
    arrays = data.load_split(args.data, "train", args.size, val_fraction=args.val_fraction)
    print(f"arrays: {len(arrays.images)} images at {args.size}px from the cache in {time.time() - t0:.1f}s", flush=True)
    fit_rates, train_rates = [], []
    with tempfile.TemporaryDirectory() as out:
        for r in range(args.rounds):
            fit_rates.append(bare_fit(arrays.images, arrays.masks, args.size, args.batch, args.filters,
                                      args.epochs, args.steps))
            print(f"round {r + 1}: bare model.fit {fit_rates[-1]:.2f} images/s", flush=True)
            train_rates.append(train_py(args, out))
            print(f"round {r + 1}: train.py      {train_rates[-1]:.2f} images/s", flush=True)
    import keras
    fit, tr = max(fit_rates), max(train_rates)
    print(f"RESULT backend={keras.backend.backend()} size={args.size} batch={args.batch} filters={args.filters} "
          f"steps={args.steps} on {cpu_line()}: train.py {tr:.2f} images/s, bare fit {fit:.2f} images/s, "
          f"ratio {tr / fit:.3f} (goal >= 0.95); total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
