"""Training on several data sets at once: `train.py --data A --data B [--balance]`.

data.load_split already loads several folders into one array, each split by its own rules, and
says which rows came from which folder. What several sources add to training lives here: a
validation callback that scores each source (val_dice_<name> in log.csv, run.json and curves.png),
and --balance, which draws every source as often as the largest one. docs/training.md.
"""
import contextlib

import numpy as np

import data
import layouts
import unet


def validation(val_set, loss, batch, ema=False, chunk=256):
    """A Keras callback that replaces fit's validation when the val set has 2+ sources (fit cannot
    split its scores by source, and a second pass for them would cost as much again): at each
    epoch's end, one prediction pass gives fit's three figures and each source's Dice, into the
    epoch's logs: val_loss, val_dice, val_iou and val_dice_<name> (a source with no rows left is
    left out). Per image and averaged as the compiled loss and metrics are; predicted in chunks, so
    a large set never holds all its probabilities at once. loss: --loss's name; ema: score the
    moving average, as fit's SwapEMAWeights would."""
    import keras
    from keras import ops

    names = layouts.source_names([s["path"] for s in val_set.sources])
    spans = {name: (s["start"], s["stop"]) for name, s in zip(names, val_set.sources)}
    if loss == "bce_lovasz":
        from extras import lovasz
        loss_fn = lovasz.bce_lovasz
    else:
        loss_fn = unet.LOSSES[loss]
    measures = (("loss", loss_fn), ("dice", unet.dice_per_image), ("iou", unet.iou_per_image))

    class PerSource(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            scores = {"loss": [], "dice": [], "iou": []}
            weights = contextlib.nullcontext()
            if ema:
                from extras import ema as average
                weights = average.averaged(self.model)
            with weights:
                for i in range(0, len(val_set.images), chunk):
                    truth = val_set.masks[i:i + chunk]
                    probs = self.model.predict(val_set.images[i:i + chunk], batch_size=batch,
                                               verbose=0)
                    for k, fn in measures:
                        scores[k].append(ops.convert_to_numpy(fn(truth, probs)))
            scores = {k: np.concatenate(v) for k, v in scores.items()}
            logs.update({f"val_{k}": float(v.mean()) for k, v in scores.items()})
            logs.update({f"val_dice_{name}": float(scores["dice"][a:b].mean())
                         for name, (a, b) in spans.items() if b > a})

    return PerSource()


class Balanced(data.Batches):
    """data.Batches that draw every source equally often (--balance): each epoch takes every
    source's rows as many times as the largest source has rows (a smaller source is repeated, in
    a fresh order each pass), instead of each row once. spans: [(start, stop)] per source."""

    def __init__(self, images, masks, batch_size, spans, **kw):
        self.spans = [(a, b) for a, b in spans if b > a]
        self.longest = max((b - a for a, b in self.spans), default=0)  # rows per source per epoch
        super().__init__(images, masks, batch_size, **kw)

    def epoch_order(self, epoch):
        seeded = np.random.default_rng([self.seed, epoch])
        passes = [np.concatenate([a + seeded.permutation(b - a)
                                  for _ in range(-(-self.longest // (b - a)))])[:self.longest]
                  for a, b in self.spans]
        return seeded.permutation(np.concatenate(passes))
