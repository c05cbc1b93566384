"""What a training run tells its user, kept out of train.py's straight read: the line that says
what is starting, each epoch's line, the images/s behind it, the lines that say how the run ended,
and run.json's account of the data and of the result. train.py calls each at its moment; nothing
here decides anything about the run.
"""
import os
import time

import numpy as np

import data


class EpochClock:
    """Images/s of an epoch's training batches from its second step: the first includes compiling
    and the feed's start-up. Fed from epoch-level hooks and on_train_batch_begin only, so it adds
    no per-step host sync."""

    def __init__(self):
        self.t_begin, self.t_second, self.t_end = time.perf_counter(), None, None
        self.second = self.calls = 0

    def batch_begins(self, batch):
        self.calls += 1
        if self.calls == 2:
            self.t_second, self.second = time.perf_counter(), batch

    def validation_begins(self):
        if self.t_end is None:  # fit's validation starts: training batches are done (synced)
            self.t_end = time.perf_counter()

    def training(self, steps, batch):
        """(seconds of the training batches, images/s from the second step)."""
        t_end = self.t_end or time.perf_counter()
        if self.t_second is not None and steps > self.second:
            ips = (steps - self.second) * batch / max(t_end - self.t_second, 1e-9)
        else:
            ips = steps * batch / max(t_end - self.t_begin, 1e-9)
        return t_end - self.t_begin, ips

    def seconds(self):
        return round(time.perf_counter() - self.t_begin, 2)


def start_line(cfg, r, model, summary):
    hosts = f" on {r.processes} processes, {r.replicas} devices" if r.processes > 1 else ""
    notes = [f"augmenting on the {r.augment_on}" if r.augment_on else "",
             "sources balanced" if cfg.balance else "",
             f"weights averaged, EMA {cfg.ema}" if cfg.ema else "",
             f"starting from {cfg.init}" if cfg.init else ""]
    return (f"training {model.name} ({model.count_params() / 1e6:.2f} M params){hosts} on "
            f"{summary['train']} images, validating on {summary['val']}, {cfg.size} px, batch "
            f"{cfg.batch}; {r.backend} {r.accelerator} {r.precision} jit={r.jit} ({r.jit_reason}) "
            f"distribute={r.distribute}" + "".join(f"; {n}" for n in notes if n))


def epoch_line(row, epochs, improved):
    names = ("loss", "val_loss", "val_dice", "val_iou", *(k for k in row if "val_dice_" in k))
    scores = "  ".join(f"{k} {row[k]:.4f}" for k in names if row[k] is not None)
    return (f"epoch {row['epoch']}/{epochs}: {scores}  lr {row['lr']:.2e}  "
            f"{row['images_per_sec']:.1f} img/s{'  *best' if improved else ''}")


def data_summary(cfg, train_set, val_set, seconds):
    """run.json's "data_summary": the folders, the split sizes, each source, what was skipped."""
    problems = train_set.problems + [p for p in val_set.problems if p not in train_set.problems]
    names = data.source_names([s["path"] for s in val_set.sources])
    summary = {"path": cfg.data, "synthetic": cfg.data is None, "train": len(train_set.pairs),
               "val": len(val_set.pairs), "problems": problems, "load_seconds": round(seconds, 1),
               "sources": [{"name": name, "path": tr["path"], "layout": tr["layout"],
                            "train": tr["stop"] - tr["start"], "val": va["stop"] - va["start"]}
                           for name, tr, va in zip(names, train_set.sources, val_set.sources)]}
    if cfg.data is None:
        from extras import synthetic
        summary["path"] = synthetic.synthetic_dir(cache=cfg.cache)
    return summary


def summarize(state, paths, t_fit):
    """run.json's "result"."""
    rates = [r["images_per_sec"] for r in state["history"]]
    best = state["best"] or {}
    return {"epochs_done": state["epoch"], "best_epoch": best.get("epoch"),
            "val_dice": best.get("val_dice"), "val_iou": best.get("val_iou"),
            "images_per_sec": float(np.median(rates[1:] or rates)) if rates else None,
            "train_seconds": round(time.time() - t_fit, 1), "stopped": state["stopped"],
            "diverged": state["diverged"],
            "files": [paths[k] for k in ("best", "last", "log", "curves", "run")]}


def finish(s):
    """Process 0 says how the run ended; the exit code (1: diverged, a failure during the run)."""
    if not s["chief"]:
        return 1 if s["diverged"] else 0
    if s["diverged"]:
        print(f"stopped: training diverged ({s['diverged']}); the last good epoch is kept",
              flush=True)
    elif s["stopped"]:
        print(f"stopped: {s['stopped']}", flush=True)
    if s["best_epoch"]:
        print(f"best epoch {s['best_epoch']} of {s['epochs_done']}: val Dice {s['val_dice']:.4f}, "
              f"val IoU {s['val_iou']:.4f}; {s['images_per_sec']:.1f} images/s (training batches)",
              flush=True)
    print("files: " + ", ".join(f for f in s["files"] if os.path.exists(f)), flush=True)
    return 1 if s["diverged"] else 0
