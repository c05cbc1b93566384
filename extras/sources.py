"""Training on several data sets at once: `train.py --data A --data B [--balance]`.

data.load_split already loads several folders into one array, each split by its own rules, and
says which rows came from which folder. What several sources add to training lives here:
validation scores per source (val_dice_<name> in log.csv, run.json and curves.png), and
--balance, which draws every source as often as the largest one. docs/training.md.
"""
import contextlib
from typing import NamedTuple

import numpy as np

import data


class PerSource(NamedTuple):
    """The validation set and each source's rows in it."""
    images: np.ndarray
    masks: np.ndarray
    spans: dict  # {source name: (start, stop)}


def per_source(val_set, images, masks):
    """PerSource of a validation split with 2+ sources (images, masks: the rows validated, which
    may be fewer than val_set's: runtime.split_evenly), else None: fit validates one source."""
    if len(val_set.sources) < 2:
        return None
    names = data.source_names([s["path"] for s in val_set.sources])
    spans = {name: (min(s["start"], len(images)), min(s["stop"], len(images)))
             for name, s in zip(names, val_set.sources)}
    return PerSource(images, masks, spans)


def validate(model, cfg, per_source, chunk=256):
    """fit's three validation figures from one prediction pass, plus each source's Dice:
    {"val_loss", "val_dice", "val_iou", "val_dice_<name>", ...}, per image and averaged as the
    compiled loss and metrics are. With 2+ sources this replaces fit's own validation, which cannot
    split its scores by source (a second pass for them would cost as much again). Predicted in
    chunks, so a large validation set never holds all its probabilities at once. With --ema the
    moving average is what is scored, as fit's SwapEMAWeights would have it."""
    from keras import ops

    import unet

    images, masks, spans = per_source
    measures = (("loss", unet.LOSSES[cfg.loss]), ("dice", unet.dice_per_image),
                ("iou", unet.iou_per_image))
    scores = {"loss": [], "dice": [], "iou": []}
    weights = contextlib.nullcontext()
    if cfg.ema:
        from extras import ema
        weights = ema.averaged(model)
    with weights:
        for i in range(0, len(images), chunk):
            truth = masks[i:i + chunk]
            probs = model.predict(images[i:i + chunk], batch_size=cfg.batch, verbose=0)
            for k, fn in measures:
                scores[k].append(ops.convert_to_numpy(fn(truth, probs)))
    scores = {k: np.concatenate(v) for k, v in scores.items()}
    row = {f"val_{k}": float(v.mean()) for k, v in scores.items()}
    row.update({f"val_dice_{name}": float(scores["dice"][a:b].mean()) if b > a else None
                for name, (a, b) in spans.items()})
    return row


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
