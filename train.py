"""Train the U-Net on ISIC-style skin-lesion data (or the built-in synthetic set when --data is absent).

    python train.py --data data/isic2018 --size 128 --epochs 20
    python train.py --data data/isic2018 --data data/ham10000      # several sets: docs/training.md
    python evaluate.py --weights best.keras

Writes OUT/best.keras (best validation Dice), OUT/last.keras (model + optimizer state, for resuming),
OUT/log.csv (one row per epoch), OUT/curves.png (the log as a picture), OUT/run.json (configuration +
data summary + result) and OUT/state.json. --tensorboard DIR adds TensorBoard's event files.

    python train.py --plot runs/a                 # redraw runs/a/curves.png from its log.csv
    python train.py --plot runs/a runs/b --out .  # several runs in one picture: ./curves.png

Interruption costs nothing: kill it at any moment and rerun the same command; it resumes after the last
finished epoch. The resume state (epoch, best score, schedule and early-stopping counters, the log rows)
is stored inside last.keras itself, so weights and state can never disagree; every file is written to a
temp file and renamed into place. A different configuration in the same OUT is refused unless --fresh.
"""
import argparse
import contextlib
import csv
import functools
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import numpy as np

import common
import data

STATE_ENTRY = "skin_unet_state.json"  # extra entry inside last.keras; Keras ignores unknown entries
LOG_FIELDS = ["epoch", "loss", "dice", "iou", "val_loss", "val_dice", "val_iou", "lr",
              "images_per_sec", "seconds"]
MIN_LR_FACTOR = 0.01   # cosine decays to 1% of --lr; plateau never goes below it either
PLATEAU_PATIENCE, PLATEAU_FACTOR = 3, 0.5


def defines_run(default):
    """A setting that defines the run: a rerun into the same --out with another value is refused (the
    weights would have another shape, or the data stream another order), unless --fresh."""
    return field(default=default, metadata={"defines_run": True})


@dataclass
class Config:
    """Every setting of a training run, with its default; parser() gives each its flag and help.
    Fields made with defines_run are the run's identity; the others (epochs, patience, jit, ...) may
    change when a run is resumed."""
    data: list = defines_run(None)  # absolute folders; None: the built-in synthetic set
    balance: bool = defines_run(False)
    init: str = defines_run(None)
    epochs: int = 40
    size: int = defines_run(256)
    batch: int = defines_run(16)
    filters: int = defines_run(12)
    depth: int = defines_run(4)
    lr: float = defines_run(1e-3)
    seed: int = defines_run(0)
    out: str = None
    loss: str = defines_run("bce_dice")
    ema: float = defines_run(0.0)
    upsample: str = defines_run("transpose")
    pool: str = defines_run("max")
    encoder: str = defines_run("none")
    encoder_weights: str = defines_run("none")
    precision: str = defines_run("auto")
    jit: str = "auto"
    distribute: str = "auto"
    cluster_timeout: int = 300
    patience: int = 10
    schedule: str = defines_run("cosine")
    val_fraction: float = defines_run(0.1)
    test_fraction: float = defines_run(0.1)
    augment: bool = defines_run(True)
    augment_on: str = "auto"
    steps_per_epoch: int = defines_run(0)
    workers: int = 0
    cache: str = None
    fresh: bool = False
    verbose: int = None
    tensorboard: str = None
    plot: list = None

    def identity(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("defines_run")}


def parser():
    p = common.ArgumentParser(description="Train the skin-lesion U-Net.")
    a = p.add_argument
    a("--data", action="append",
      help="data folder (ISIC 2016/2017/2018, HAM10000 or images/ + masks/); repeat to train on several, "
           "each split by its own rules; default: synthetic")
    a("--balance", action="store_true",
      help="with several --data: draw each source equally often (default: each image once per epoch)")
    a("--init", help="start from the weights of this .keras, e.g. a model pre-trained on another set; same "
                     "--size, --filters, --depth, --encoder")
    a("--epochs", type=int)
    a("--size", type=int, help="square input size in pixels, a multiple of 2**depth")
    a("--batch", type=int)
    a("--filters", type=int,
      help="filters of the first level (doubling per level); 32 is the paper-sized network")
    a("--depth", type=int, help="number of poolings")
    a("--lr", type=float)
    a("--seed", type=int)
    a("--out", help="output folder (default: here, so evaluate.py --weights best.keras follows)")
    a("--loss", choices=["bce_dice", "dice", "bce", "bce_lovasz"])
    a("--ema", type=float,
      help="keep a moving average of the weights with this momentum (e.g. 0.995) and validate and save "
           "best.keras with it; 0: off")
    a("--upsample", choices=["transpose", "matmul"],
      help="decoder up-sampling: Conv2DTranspose, or the same function as one matmul + pixel shuffle")
    a("--pool", choices=["max", "reshape"],
      help="encoder down-sampling: MaxPooling2D, or the same maximum as a reshape + max")
    a("--encoder", choices=["none", "mobilenetv3", "mobilenetv3small", "efficientnetb0", "resnet50"])
    a("--encoder-weights", choices=["imagenet", "none"],
      help="imagenet downloads the backbone weights on first use")
    a("--precision", choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"],
      help="auto: mixed_bfloat16 on a GPU/TPU, float32 on CPU")
    a("--jit", choices=["auto", "on", "off"],
      help="XLA; auto: on for JAX and on an accelerator; TensorFlow on a CPU times both at the start of a long "
           "run and keeps the faster (a short run: off)")
    a("--distribute", choices=["auto", "none", "mirrored", "data_parallel"],
      help="mirrored: tf.distribute (TF backend); data_parallel: keras.distribution (JAX backend), also over "
           "several processes (hosts) when KERAS_DISTRIBUTION_* or SLURM variables say so (docs/training.md)")
    a("--cluster-timeout", type=int, metavar="S",
      help="several processes: seconds to wait for all to join, and for a silent one before the rest stop")
    a("--patience", type=int, help="early stopping after N epochs without val Dice gain; 0: off")
    a("--schedule", choices=["cosine", "plateau"])
    a("--val-fraction", type=float)
    a("--test-fraction", type=float)
    a("--no-augment", dest="augment", action="store_false")
    a("--augment-on", choices=["auto", "host", "device"],
      help="where augmentation's pixel work runs (the random draws are the same): host = Pillow in the feed's "
           "threads, device = keras.ops on the accelerator; auto: device on a GPU/TPU, host on a CPU")
    a("--steps-per-epoch", type=int, help="cap training batches per epoch (0: all)")
    a("--workers", type=int, help="batch-loading threads (0: all cores)")
    a("--cache", help="array cache folder (default: $SKIN_UNET_CACHE or ~/.cache/skin-unet)")
    a("--fresh", action="store_true", help="discard an earlier run in OUT instead of resuming it")
    a("--verbose", type=int, choices=[0, 1, 2], help="Keras progress: 1 bar, 2 one line (default: 1 on a terminal)")
    a("--tensorboard", metavar="DIR",
      help="also write TensorBoard event files (scalars per epoch) to DIR: tensorboard --logdir DIR")
    a("--plot", nargs="+", metavar="RUN",
      help="only draw: RUN/curves.png from RUN/log.csv; several RUNs: one picture, a line per run, in --out")
    p.set_defaults(**{f.name: f.default for f in fields(Config)})
    return p


def config_of(cfg):
    """A Config from a Config, dict, Namespace or argv list (defaults for what it leaves out),
    validated. Raises common.Error (exit 2)."""
    if isinstance(cfg, (list, tuple)):
        cfg = vars(parser().parse_args(list(cfg)))
    elif isinstance(cfg, argparse.Namespace):
        cfg = vars(cfg)
    elif isinstance(cfg, Config):
        cfg = asdict(cfg)
    cfg = Config(**cfg)
    for key in ("epochs", "batch", "filters", "depth"):
        if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 1:
            raise common.Error(f"--{key.replace('_', '-')} {getattr(cfg, key)!r}", "must be a positive integer")
    for key in ("patience", "steps_per_epoch", "workers"):
        if getattr(cfg, key) < 0:
            raise common.Error(f"--{key.replace('_', '-')} {getattr(cfg, key)}", "must be >= 0")
    if not cfg.lr > 0:
        raise common.Error(f"--lr {cfg.lr}", "must be > 0")
    if not 0 <= cfg.ema < 1:
        raise common.Error(f"--ema {cfg.ema}", "must be in [0, 1) (0: off)")
    if not (0 <= cfg.val_fraction < 1 and 0 <= cfg.test_fraction < 1
            and cfg.val_fraction + cfg.test_fraction < 1):
        raise common.Error(f"--val-fraction {cfg.val_fraction} / --test-fraction {cfg.test_fraction}",
                         "each in [0, 1) and together < 1")
    depth = cfg.depth if cfg.encoder == "none" else 5
    if not (isinstance(cfg.size, int) and cfg.size > 0 and cfg.size % 2 ** depth == 0):
        extra = "" if cfg.encoder == "none" else f" (encoder {cfg.encoder} has 5 strides)"
        raise common.Error(f"--size {cfg.size}", f"must be a multiple of 2**depth = {2 ** depth}{extra}")
    cfg.data = data_value(cfg.data)
    if cfg.balance and len(cfg.data or []) < 2:
        raise common.Error("--balance", "needs two or more --data folders")
    if cfg.init is not None:
        if not os.path.isfile(cfg.init):
            raise common.Error(f"--init {cfg.init}", "file not found")
        cfg.init = os.path.abspath(cfg.init)
    cfg.out = os.path.abspath(cfg.out or ".")
    if cfg.tensorboard:
        missing = [m for m in ("tensorboard", "tensorflow") if importlib.util.find_spec(m) is None]
        if missing:  # checked before anything runs: never a failure mid-run
            raise common.Error("--tensorboard", f"needs {' and '.join(missing)} (pip install {' '.join(missing)}); "
                             "TensorFlow writes the event files on every Keras backend")
        cfg.tensorboard = os.path.abspath(cfg.tensorboard)
    return cfg


def data_value(value):
    """--data as stored: None (synthetic) or a list of absolute paths. (Runs from before several
    folders were possible stored one path as a string: data.folders_of reads both.)"""
    folders = []
    for folder in data.folders_of(value):
        if not os.path.isdir(folder):
            raise common.Error(folder, "data folder not found")
        folder = os.path.abspath(folder)
        if folder in folders:  # the same images twice would weigh one set double, silently
            raise common.Error(f"--data {folder}", "given twice")
        folders.append(folder)
    return folders or None


def check_writable(out):
    try:
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):  # temp files of a run killed mid-write (never the real files)
            if name.startswith(".tmp-"):
                os.remove(os.path.join(out, name))
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise common.Error(out, f"output folder is not writable ({e.strerror or e})") from None


# --- files, always written to a temp file beside the target and renamed into place (common.atomic_path) ---
def atomic_write_text(path, text):
    common.atomic_write(path, lambda f: f.write(text.encode()))


def write_log(path, rows):
    # Per-source columns (val_dice_<name>) exist only with 2+ sources; rows carry them, in order.
    fields = LOG_FIELDS + [k for k in (rows[0] if rows else {}) if k not in LOG_FIELDS]
    lines = [",".join(fields)]
    for r in rows:
        lines.append(",".join("" if r.get(k) is None else f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k])
                              for k in fields))
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_log(path):
    """log.csv as rows of numbers (None where a cell is empty), as state["history"] holds them."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if "epoch" not in (reader.fieldnames or ()):
                raise ValueError("no epoch column")
            rows = []
            for row in reader:
                if None in row:  # DictReader files a row's extra cells under the key None
                    raise ValueError(f"line {reader.line_num}: more cells than the header")
                rows.append({k: None if v in ("", None) else int(v) if k == "epoch" else float(v)
                             for k, v in row.items()})
            return rows
    except FileNotFoundError:
        raise common.Error(path, "not found (a run folder holds log.csv after its first epoch)") from None
    except (ValueError, csv.Error) as e:
        raise common.Error(path, f"not a train.py log ({common.one_line(e)})") from None


def draw_curves(path, runs):
    """curves.png: loss (train solid, val dashed), val Dice (solid) and IoU (dotted) with each source's
    val Dice, and the learning rate, per epoch; a ring marks each run's best val Dice. runs: [(name,
    rows)], one line set per run. matplotlib's object API with the Agg canvas: no pyplot, no window, no
    global state. The epochs drawn are in the PNG's Description chunk. Written atomically."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 3.6), dpi=100, layout="constrained")
    loss_ax, score_ax, lr_ax = fig.subplots(1, 3)
    drawn = {}
    for i, (name, rows) in enumerate(runs):
        colour, label = f"C{i}", f"{name}: " if len(runs) > 1 else ""
        epochs = [r["epoch"] for r in rows]
        drawn[name or "run"] = len(rows)

        def line(ax, key, style="-", text=None, **kw):
            points = [(e, r[key]) for e, r in zip(epochs, rows) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), style, color=kw.pop("color", colour), label=label + (text or key), **kw)
            return points

        line(loss_ax, "loss", "-", "train loss")
        line(loss_ax, "val_loss", "--", "val loss")
        dice = line(score_ax, "val_dice", "-", "val Dice")
        line(score_ax, "val_iou", ":", "val IoU")
        sources = [k for k in (rows[0] if rows else {}) if k.startswith("val_dice_")]
        for j, key in enumerate(sources):
            line(score_ax, key, "-", key[len("val_dice_"):] + " Dice", color=f"C{len(runs) + i * len(sources) + j}",
                 linewidth=0.8, alpha=0.8)
        line(lr_ax, "lr", "-", "lr")
        if dice:
            best = max(dice, key=lambda p: p[1])
            score_ax.plot(*best, "o", color=colour, markerfacecolor="none", markersize=9)
            score_ax.annotate(f"best {best[1]:.3f}, epoch {best[0]}", best, textcoords="offset points",
                              xytext=(-6, -14), ha="right", fontsize=8, color=colour)
    for ax, title in ((loss_ax, "loss"), (score_ax, "validation (per image, > 0.5)"), (lr_ax, "learning rate")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    lr_ax.set_yscale("log")
    with common.atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Description": json.dumps({"epochs": drawn})})
    return drawn


def plot_command(cfg):
    """--plot RUN [RUN ...]: draw from log.csv files alone (no Keras): RUN/curves.png for one run, else
    curves.png in --out (default: here), a line set per run named by its folder."""
    folders = [os.path.abspath(f) for f in cfg.plot]
    runs = [(os.path.basename(f) or f, read_log(os.path.join(f, "log.csv"))) for f in folders]
    out = cfg.out or (folders[0] if len(folders) == 1 else ".")
    path = os.path.join(out, "curves.png")
    try:
        drawn = draw_curves(path, runs)
    except ImportError:
        raise common.Error("--plot", "needs matplotlib (pip install matplotlib)") from None
    print(f"wrote {path} ({', '.join(f'{k}: {n} epochs' for k, n in drawn.items())})")
    return 0


def save_model(model, path, state=None):
    """model.save to a temp .keras, add the resume state as an extra zip entry, fsync, rename."""
    with common.atomic_path(path, ".keras") as tmp:
        model.save(tmp)
        if state is not None:
            with zipfile.ZipFile(tmp, "a") as z:
                z.writestr(STATE_ENTRY, json.dumps(state))


def copy_atomic(src, dst):
    with common.atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


@contextlib.contextmanager
def ema_weights(model, on=True):
    """With --ema: the optimizer's moving average in the model's weights for the duration, the trained
    weights back afterwards (Keras's SwapEMAWeights callback, driven by hand). on=False: no change."""
    import keras
    if not on:
        yield
        return
    swap = keras.callbacks.SwapEMAWeights()
    swap.set_model(model)
    swap.on_test_begin()
    try:
        yield
    finally:
        swap.on_test_end()


def save_best(model, cfg, paths, state):
    """best.keras is last.keras as committed, or with --ema the weights that were validated: the average."""
    if cfg.ema:
        with ema_weights(model):
            save_model(model, paths["best"], state)
    elif os.path.exists(paths["last"]):  # (a cluster's process 1.. repairing before its first save has none)
        copy_atomic(paths["last"], paths["best"])


def read_state(path):
    """The resume state stored inside a .keras file, or None."""
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read(STATE_ENTRY))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError):
        return None


# --- the per-epoch bookkeeping ----------------------------------------------------------------------
def epoch_decision(state, row, cfg):
    """What one epoch's log row means for the run, as the state entries it changes (a pure function:
    no Keras, no files). A non-finite loss or val_loss: "diverged" says so and nothing else changes.
    Otherwise the epoch is appended; a better val Dice (the loss, without validation) becomes "best"
    and resets the waits; else they grow, the plateau schedule halves the lr (not below MIN_LR_FACTOR
    of --lr) every PLATEAU_PATIENCE epochs, and --patience epochs without a gain set "stopped"."""
    if not all(math.isfinite(row[k]) for k in ("loss", "val_loss") if row.get(k) is not None):
        return {"diverged": f"loss {row['loss']} / val_loss {row.get('val_loss')} at epoch {row['epoch']}",
                "stopped": state["stopped"]}
    new = {"diverged": None, "stopped": state["stopped"], "epoch": row["epoch"],
           "history": [*state["history"], row], "best": state["best"], "wait": state["wait"] + 1,
           "plateau_wait": state["plateau_wait"] + 1, "lr": state["lr"]}
    score = row["val_dice"] if row.get("val_dice") is not None else -row["loss"]
    if state["best"] is None or score > state["best"]["score"]:
        new["best"] = {"epoch": row["epoch"], "score": score, "val_dice": row.get("val_dice"),
                       "val_iou": row.get("val_iou"), "val_loss": row.get("val_loss")}
        new["wait"] = new["plateau_wait"] = 0
    elif cfg.schedule == "plateau" and new["plateau_wait"] >= PLATEAU_PATIENCE:
        new["lr"] = max(state["lr"] * PLATEAU_FACTOR, cfg.lr * MIN_LR_FACTOR)
        new["plateau_wait"] = 0
    if cfg.patience and new["wait"] >= cfg.patience:
        new["stopped"] = f"early stopping: no val Dice gain for {new['wait']} epochs"
    return new


def cosine_lr(cfg, epoch):
    lo = cfg.lr * MIN_LR_FACTOR
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))


def validate(model, loss_name, images, masks, batch, spans, chunk=256):
    """fit's three validation figures from one prediction pass, plus each source's Dice: {"val_loss",
    "val_dice", "val_iou", "val_dice_<name>", ...}, per image and averaged as the compiled loss and
    metrics are. With 2+ sources this replaces fit's own validation, which cannot split its scores by
    source (a second pass for them cost as much again). Predicted in chunks, so a large validation set
    never holds all its probabilities at once."""
    from keras import ops

    import unet

    scores = {"loss": [], "dice": [], "iou": []}
    for i in range(0, len(images), chunk):
        truth, probs = masks[i:i + chunk], model.predict(images[i:i + chunk], batch_size=batch, verbose=0)
        for k, fn in (("loss", unet.LOSSES[loss_name]), ("dice", unet.dice_per_image), ("iou", unet.iou_per_image)):
            scores[k].append(ops.convert_to_numpy(fn(truth, probs)))
    scores = {k: np.concatenate(v) for k, v in scores.items()}
    row = {f"val_{k}": float(v.mean()) for k, v in scores.items()}
    row.update({f"val_dice_{name}": float(scores["dice"][a:b].mean()) if b > a else None
                for name, (a, b) in spans.items()})
    return row


class PerSource(NamedTuple):
    """With 2+ --data sources, the validation set and each source's rows in it: validation (all, and
    per source) is then done by the epoch callback instead of by fit."""
    images: np.ndarray
    masks: np.ndarray
    spans: dict  # {source name: (start, stop)}


def make_epoch_callback(cfg, state, steps, paths, per_source=None, chief=True):
    """The callback that ends every epoch (EpochEnd); per_source: a PerSource, or None with one source.
    chief False (processes 1.. of a run over several): the same steps, into their scratch `paths`
    (saving a model is a collective step every process must take), and no printing."""
    import keras
    source_names = list(per_source.spans) if per_source else []

    class EpochEnd(keras.callbacks.Callback):
        """Schedule, images/s, NaN guard, early stopping, checkpoints and the CSV log, all in one place so
        that their state is committed together (inside last.keras) at the end of each epoch.
        Only epoch-level hooks plus on_train_batch_begin: no per-step host syncs (Keras may then
        dispatch batch callbacks asynchronously)."""
        no_curves = False  # set after the first failed drawing (no matplotlib, a full disk)

        def on_epoch_begin(self, epoch, logs=None):
            lr = cosine_lr(cfg, epoch) if cfg.schedule == "cosine" else state["lr"]
            self.model.optimizer.learning_rate = lr
            self.lr = lr
            self.t_begin, self.t_second, self.second, self.t_end, self.calls = time.perf_counter(), None, 0, None, 0

        def on_train_batch_begin(self, batch, logs=None):
            # Time from the 2nd step: the 1st includes compilation (first epoch) and the feed start-up.
            self.calls += 1
            if self.calls == 2:
                self.t_second, self.second = time.perf_counter(), batch

        def on_test_begin(self, logs=None):
            if self.t_end is None:  # fit's validation starts: training batches are done (and synced)
                self.t_end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            now = time.perf_counter()
            t_end = self.t_end or now
            if self.t_second is not None and steps > self.second:
                ips = (steps - self.second) * cfg.batch / max(t_end - self.t_second, 1e-9)
            else:
                ips = steps * cfg.batch / max(t_end - self.t_begin, 1e-9)
            row = {"epoch": epoch + 1, "lr": float(self.lr), "images_per_sec": round(ips, 2),
                   "seconds": round(now - self.t_begin, 2)}
            for k in ("loss", "dice", "iou", "val_loss", "val_dice", "val_iou"):
                row[k] = float(logs[k]) if k in logs else None
            if per_source:
                with ema_weights(self.model, cfg.ema > 0):
                    row.update(validate(self.model, cfg.loss, per_source.images, per_source.masks, cfg.batch,
                                        per_source.spans))
                row["seconds"] = round(time.perf_counter() - self.t_begin, 2)
            decided = epoch_decision(state, row, cfg)
            state.update(decided)
            if decided["diverged"] or decided["stopped"]:
                self.model.stop_training = True
            if decided["diverged"]:  # NaN guard: keep the last good checkpoint, commit nothing from this epoch
                return
            improved = decided["best"] is not None and decided["best"]["epoch"] == epoch + 1
            # Commit point: last.keras holds weights, optimizer and state together. A kill before this
            # line replays the epoch; after it, the files below are repaired from last.keras on resume.
            save_model(self.model, paths["last"], state)
            if improved:
                save_best(self.model, cfg, paths, state)
            if chief:  # saving a model is collective (above); the rest is process 0's alone
                atomic_write_text(paths["state"], json.dumps(state, indent=1))
                write_log(paths["log"], state["history"])
            if chief and not self.no_curves:
                try:
                    draw_curves(paths["curves"], [("", state["history"])])
                except (OSError, ImportError) as e:  # a picture is not worth a run: say so once, go on
                    self.no_curves = True
                    print(f"note: {paths['curves']}: not drawn ({common.one_line(e)})", file=sys.stderr)
            # TensorBoard (after this callback) logs what fit put in logs; add what only this one knows.
            logs.update({k: v for k, v in row.items() if k.startswith("val_") and v is not None})
            scores = "  ".join(f"{k} {row[k]:.4f}" for k in ("loss", "val_loss", "val_dice", "val_iou",
                                                              *(f"val_dice_{n}" for n in source_names))
                               if row[k] is not None)
            if chief:
                print(f"epoch {epoch + 1}/{cfg.epochs}: {scores}  lr {row['lr']:.2e}  {ips:.1f} img/s"
                      f"{'  *best' if improved else ''}", flush=True)

    return EpochEnd()


# --- backend setup ----------------------------------------------------------------------------------
def accelerator():
    """'gpu' / 'tpu' when the active backend sees one, else 'cpu' (never imports another backend)."""
    import keras
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        return jax.default_backend() if jax.default_backend() in ("gpu", "tpu") else "cpu"
    if backend == "tensorflow":
        import tensorflow as tf  # TF backend only
        return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    if backend == "torch":
        import torch
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu"


def cpu_info():
    """The host CPU as run.json and every benchmark record it: {"model", "flags" (of avx2, avx512f,
    avx512_bf16, amx_tile), "cores"}. Whether XLA helps a CPU step depends on it (docs/training.md)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    return {"model": model, "flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
            "cores": os.cpu_count()}


def cpu_line():
    c = cpu_info()
    return f"{c['model']} ({' '.join(c['flags']) or 'no avx2'}), {c['cores']} cores"


# XLA on a CPU: a TensorFlow XLA step was 1.8-2.1x Keras's own on a 2-core AMD EPYC (AVX2) and 0.75x it
# on a 2-core Intel Xeon (AVX-512). So on a CPU a long run times both on its first batch and keeps the
# faster; a short one (the probe would cost over ~5% of it) keeps Keras's CPU default, off.
XLA_PROBE_MIN_STEPS = 500
XLA_PROBE_STEPS, XLA_PROBE_ROUNDS, XLA_PROBE_MARGIN = 3, 2, 1.05


def jit_rule(cfg, accel, mode):
    """(XLA on?, why) for this backend and machine; (None, why) where only a timed probe can tell."""
    import keras
    if cfg.jit != "auto":
        return cfg.jit == "on", f"--jit {cfg.jit}"
    backend = keras.backend.backend()
    if backend == "jax":
        return True, "JAX runs op by op without it"
    if backend != "tensorflow":
        return False, f"{backend}: Keras's default"
    if mode == "mirrored":
        return False, "XLA cannot reach MirroredStrategy's per-device variables"
    if accel != "cpu":
        return True, "on an accelerator XLA fuses batch norm and ReLU into the convolutions"
    return None, "TensorFlow on a CPU: XLA helps on some CPUs and hurts on others"


def probe_jit(cfg, x, y):
    """Time XLA against TensorFlow's own kernels on this machine: a throwaway copy of the model per
    setting, one warm-up step (which compiles), then XLA_PROBE_STEPS steps, in XLA_PROBE_ROUNDS
    interleaved rounds, best of each. XLA only where it wins by XLA_PROBE_MARGIN. (jit, why, rates)."""
    import unet

    models = {}
    for jit in (True, False):
        models[jit] = new_model(unet, cfg)
        unet.compile_model(models[jit], cfg.loss, cfg.lr, jit)
        models[jit].train_on_batch(x, y)
    rates = {True: 0.0, False: 0.0}
    for _ in range(XLA_PROBE_ROUNDS):
        for jit, model in models.items():
            t = time.perf_counter()
            for _ in range(XLA_PROBE_STEPS):
                model.train_on_batch(x, y)  # synchronous: returns host numbers
            rates[jit] = max(rates[jit], XLA_PROBE_STEPS * len(x) / (time.perf_counter() - t))
    del models
    jit = rates[True] > XLA_PROBE_MARGIN * rates[False]
    why = f"probe on this CPU: XLA {rates[True]:.1f} vs {rates[False]:.1f} images/s without"
    return jit, why, {"xla": round(rates[True], 2), "no_xla": round(rates[False], 2)}


# --- several processes (hosts): JAX's distributed runtime ------------------------------------------
WORKER_ENV = "SKIN_UNET_CLUSTER_WORKER"  # set in the child process that joins the cluster (supervise)


class Cluster(NamedTuple):
    coordinator: str  # host:port of process 0; None where JAX finds it itself (SLURM)
    processes: int
    index: int


def cluster_of(env=os.environ):
    """This process's place in a run over several processes, or None for one. The variables are
    keras.distribution.initialize's (KERAS_DISTRIBUTION_JOB_ADDRESSES: process 0's host:port first,
    KERAS_DISTRIBUTION_NUM_PROCESSES, KERAS_DISTRIBUTION_PROCESS_ID), else SLURM's (SLURM_NTASKS,
    SLURM_PROCID; JAX then reads the coordinator from SLURM's node list itself)."""
    keras_vars = "KERAS_DISTRIBUTION_NUM_PROCESSES" in env
    names = ("KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID") if keras_vars else \
        ("SLURM_NTASKS", "SLURM_PROCID")
    try:
        processes, index = (int(env.get(name, "1" if i == 0 else "0")) for i, name in enumerate(names))
    except ValueError:
        raise common.Error(names[0], f"{env.get(names[0])!r} / {env.get(names[1])!r}: not whole numbers") from None
    if processes < 2:
        return None
    if not 0 <= index < processes:
        raise common.Error(names[1], f"{index} is not a process of 0..{processes - 1}")
    addresses = env.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "")
    coordinator = addresses.split(",")[0].strip() or None
    if coordinator is None and keras_vars:
        raise common.Error("KERAS_DISTRIBUTION_JOB_ADDRESSES", "not set: give process 0's host:port")
    return Cluster(coordinator, processes, index)


def check_cluster(cfg, cluster, backend):
    """What a run over several processes needs, checked before any process waits for the others.
    backend: Keras's own answer (KERAS_BACKEND, else ~/.keras/keras.json)."""
    if backend != "jax":
        raise common.Error("KERAS_BACKEND", f"{backend}: a run over several processes needs jax (JAX's distributed "
                         "runtime; tf.distribute here covers one TensorFlow host)")
    if cfg.batch % cluster.processes:
        raise common.Error(f"--batch {cfg.batch}", f"must be a multiple of the {cluster.processes} processes "
                         "(each loads an equal part of every batch)")
    if len(cfg.data or []) > 1:
        raise common.Error("--data", "several sources are validated per source in one process; "
                         "give one --data for a run over several processes")
    if cfg.distribute not in ("auto", "data_parallel"):
        raise common.Error(f"--distribute {cfg.distribute}", "a run over several processes is data_parallel")


PEER_LOST = ("Gloo", "Connection closed by peer", "coordination service", "DEADLINE_EXCEEDED", "UNAVAILABLE")


def peer_lost(cluster, timeout):
    """The one line for a cluster whose peer died or went silent."""
    return common.Error(f"process {cluster.index} of {cluster.processes}",
                      f"another process died or went silent for {timeout} s, so this one stopped; rerun the "
                      "same command on every host to resume after the last finished epoch", exit_code=1)


def join_cluster(cluster, timeout):
    """Connect this process to the others through JAX's distributed runtime: after it, every device
    of every process is in keras.distribution.list_devices()."""
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives; GPUs use NCCL
    jax.distributed.initialize(cluster.coordinator, cluster.processes, cluster.index,
                               initialization_timeout=timeout, heartbeat_timeout_seconds=timeout)


def supervise(argv, cluster, timeout):
    """Run this same command in a child process that joins the cluster, passing its output through.
    JAX's runtime ends a process whose peer died or never came with a fatal C++ log and a stack
    trace; here that becomes one line and exit 1. The child's own errors (exit 2) pass as they are."""
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stderr=subprocess.PIPE,
                             env={**os.environ, WORKER_ENV: "1"}, text=True, errors="replace")
    fatal, said = "", False
    for line in child.stderr:
        if not fatal and "detected fatal errors" not in line and not line.startswith("*** Check failure"):
            sys.stderr.write(line)
            sys.stderr.flush()
            said = said or line.startswith("error: ")
        else:
            fatal += line
    code = child.wait()
    if said or (not fatal and code >= 0):  # the child said what went wrong (or nothing did)
        return code if code > 0 or not said else 1
    who = f"process {cluster.index} of {cluster.processes}"
    if "RegisterTask" in fatal:  # the RPC that joins a process to the coordinator
        raise common.Error(who, f"the processes did not all join within {timeout} s (coordinator "
                         f"{cluster.coordinator or 'from SLURM'}): start the same command on every host, "
                         "check the address and port", exit_code=1)
    raise peer_lost(cluster, timeout)


def setup_backend(cfg, cluster=None):
    """Resolve precision / jit / distribution for this machine; returns (strategy scope or None, info).
    info["jit"] is None where train() must probe (jit_rule). cluster: every device of every process."""
    import keras
    accel = accelerator()
    backend = keras.backend.backend()
    precision = cfg.precision if cfg.precision != "auto" else ("mixed_bfloat16" if accel != "cpu" else "float32")
    keras.mixed_precision.set_global_policy(precision)
    devices = [d for d in keras.distribution.list_devices() if not d.lower().startswith("cpu")] \
        if backend == "jax" else []
    mode = cfg.distribute
    if mode == "auto":
        mode = "none"
        if backend == "jax" and (len(devices) > 1 or cluster):
            mode = "data_parallel"
        elif backend == "tensorflow" and accel == "gpu":
            import tensorflow as tf  # TF backend only
            mode = "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "none"
    strategy, replicas = None, 1
    if mode == "mirrored":
        if backend != "tensorflow":
            raise common.Error("--distribute mirrored", f"needs KERAS_BACKEND=tensorflow (this is {backend})")
        import tensorflow as tf  # TF backend only
        gpus = tf.config.list_logical_devices("GPU")
        names = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        strategy = tf.distribute.MirroredStrategy(names)
        replicas = strategy.num_replicas_in_sync
    elif mode == "data_parallel":
        if backend != "jax":
            raise common.Error("--distribute data_parallel", f"needs KERAS_BACKEND=jax (this is {backend})")
        all_devices = keras.distribution.list_devices()
        distribution = keras.distribution.DataParallel(devices=all_devices)
        distribution.auto_shard_dataset = False  # each process's Batches already hold only its part
        keras.distribution.set_distribution(distribution)
        replicas = len(all_devices)
    if cfg.batch % replicas:
        if mode == "data_parallel":
            keras.distribution.set_distribution(None)
        raise common.Error(f"--batch {cfg.batch}", f"must be a multiple of the {replicas} replicas")
    # Augmentation's pixel work: Pillow threads feed a CPU-bound step easily (over 20x what it takes on
    # the 2-core CPU) but cap a GPU at ~400 images/s (GIL-bound); there, keras.ops on the device.
    augment_on = cfg.augment_on if cfg.augment_on != "auto" else "host" if accel == "cpu" else "device"
    jit, why = jit_rule(cfg, accel, mode)
    return strategy, {"backend": backend, "accelerator": accel, "cpu": cpu_info(), "precision": precision,
                      "jit": jit, "jit_reason": why, "distribute": mode, "replicas": replicas,
                      "processes": cluster.processes if cluster else 1, "process": cluster.index if cluster else 0,
                      "augment_on": augment_on if cfg.augment else None}


def split_evenly(val_set, replicas):
    """Data-parallel validation needs every batch to split evenly over the replicas (tf.distribute fails
    on uneven shards): keep a multiple of `replicas` images (at most replicas - 1 dropped, said once)."""
    keep = len(val_set.images) // replicas * replicas
    if keep == 0:
        raise common.Error("--val-fraction", f"{len(val_set.images)} validation images cannot be split over "
                         f"{replicas} replicas; raise it")
    if keep < len(val_set.images):
        print(f"note: validating on {keep} of {len(val_set.images)} images (a multiple of {replicas} replicas)",
              file=sys.stderr)
    return val_set.images[:keep], val_set.masks[:keep]


def tensorboard(cfg):
    """[keras.callbacks.TensorBoard] with --tensorboard: scalars once per epoch (the loss, Dice and IoU,
    their val_ forms and each source's val Dice, the learning rate), no graph, no profiling."""
    import keras
    if not cfg.tensorboard:
        return []
    return [keras.callbacks.TensorBoard(cfg.tensorboard, histogram_freq=0, write_graph=False,
                                        update_freq="epoch", profile_batch=0)]


def feed(batches, workers, warp=None):
    """data.Batches as a keras.utils.PyDataset: fit's worker threads call batches[i] in parallel
    (augmentation is Pillow C code that releases the GIL, and threads share the arrays for free).
    warp (device_warp): the threads only gather and draw, and hand the uint8 batch and its draws to
    the compiled keras.ops warp, which returns arrays on the accelerator that fit takes as they are
    (on JAX a device array is not copied again)."""
    import keras
    class Feed(keras.utils.PyDataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, index):
            return batches[index] if warp is None else warp(*batches.draw(index))

        def on_epoch_end(self):
            batches.on_epoch_end()

    return Feed(workers=workers, max_queue_size=16)


def compiled(fn):
    """fn (keras.ops code) compiled by the backend's own compiler: jax.jit, or tf.function with XLA;
    torch runs it eagerly. A new input shape compiles again, so callers keep the shape fixed."""
    import keras
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf  # TF backend only
        return tf.function(fn, jit_compile=True)
    return fn


def device_warp(batches):
    """data.warp_device compiled for the accelerator, and run once on a batch of this shape before fit
    (so the first epoch's speed does not include the compile)."""
    import keras
    warp = compiled(data.warp_device)
    x, y, colour, affine = batches.draw(0)
    keras.ops.convert_to_numpy(warp(x, y, colour, affine)[1])
    return warp


# --- train(): resume or start, data, model, fit, summary ------------------------------------------
def resume_or_start(cfg, identity, paths, chief=True):
    """The resume state inside last.keras when it belongs to this configuration, else a fresh one.
    --fresh deletes the old run's files (process 0 only; the others just ignore them)."""
    if cfg.fresh and chief:
        for k in ("last", "state", "log", "best", "curves"):  # (run.json is rewritten before fit)
            if os.path.exists(paths[k]):
                os.remove(paths[k])
    state = None if cfg.fresh else read_state(paths["last"])
    if state is not None:
        # A key that a run from before it existed lacks had its default value then.
        defaults = Config().identity()
        earlier = {k: state.get("config", {}).get(k, default) for k, default in defaults.items()}
        # "data" compared as a list: a run stored as one path resumes from the same single --data.
        changed = [k for k in defaults if (data.folders_of(earlier[k]) != data.folders_of(identity[k]) if k == "data"
                                           else earlier[k] != identity[k])]
        if changed:
            diff = [f"{k} {earlier[k]!r} -> {identity[k]!r}" for k in changed]
            raise common.Error(paths['last'], f"holds a run with another configuration ({'; '.join(diff)}); "
                             "rerun with --fresh to discard it, or use another --out")
    if state is None:
        state = {"version": 1, "config": identity, "epoch": 0, "best": None, "wait": 0,
                 "plateau_wait": 0, "lr": cfg.lr, "history": [], "stopped": None}
    state["diverged"] = None
    return state


def load_data(cfg, info, epoch):
    """(training batches, validation batches, summary for run.json, per-source validation arrays).
    Several --data folders: each is split by its own rules (layout, lesion metadata); training uses
    the union of their train splits, validation the union of their val splits; with 2+ sources the
    epoch callback validates (validate(): all, and each source's rows alone) instead of fit. Over
    several processes, each one's Batches give it its part of every batch. Fails with one line on a
    missing or empty folder, before any model is built."""
    t0 = time.time()
    part = (info["process"], info["processes"])
    kw = {"size": cfg.size, "cache": cfg.cache, "progress": sys.stderr.isatty(),
          "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction}
    train_set = data.load_split(cfg.data, "train", **kw)
    val_set = data.load_split(cfg.data, "val", **kw)
    train_batches = data.Batches(train_set.images, train_set.masks, cfg.batch, augment=cfg.augment,
                                 seed=cfg.seed, epoch=epoch, drop_remainder=True, steps=cfg.steps_per_epoch,
                                 balance=[(s["start"], s["stop"]) for s in train_set.sources] if cfg.balance else None,
                                 part=part)
    val_images, val_masks = split_evenly(val_set, info["replicas"])
    val_batches = data.Batches(val_images, val_masks, cfg.batch, augment=False, shuffle=False, part=part)
    from extras import synthetic  # the default set: no --data
    summary = {"path": cfg.data or synthetic.synthetic_dir(cache=cfg.cache), "synthetic": cfg.data is None,
               "train": len(train_set.pairs), "val": len(val_set.pairs),
               "problems": train_set.problems + [p for p in val_set.problems if p not in train_set.problems],
               "load_seconds": round(time.time() - t0, 1)}
    names = data.source_names([s["path"] for s in val_set.sources])
    summary["sources"] = [{"name": name, "path": tr["path"], "layout": tr["layout"],
                           "train": tr["stop"] - tr["start"], "val": va["stop"] - va["start"]}
                          for name, tr, va in zip(names, train_set.sources, val_set.sources)]
    spans = {name: (min(va["start"], len(val_images)), min(va["stop"], len(val_images)))
             for name, va in zip(names, val_set.sources)}
    per_source = PerSource(val_images, val_masks, spans) if len(names) > 1 else None
    return train_batches, val_batches, summary, per_source


def new_model(unet, cfg):
    return unet.build_unet(cfg.size, cfg.filters, cfg.depth, upsample=cfg.upsample, pool=cfg.pool,
                           encoder=None if cfg.encoder == "none" else cfg.encoder,
                           encoder_weights=None if cfg.encoder_weights == "none" else cfg.encoder_weights)


def settle_jit(cfg, info, state, batches):
    """Where jit_rule leaves it to a probe: probe a run long enough to pay for it, else XLA off."""
    import keras
    if info["jit"] is not None:
        return
    planned = max(cfg.epochs - state["epoch"], 0) * len(batches)
    if planned < XLA_PROBE_MIN_STEPS:
        info["jit"], info["jit_reason"] = False, f"Keras's CPU default (a run of {planned} steps is too short to probe)"
        return
    x, y = batches[0]
    info["jit"], info["jit_reason"], info["jit_probe"] = probe_jit(cfg, x, y)
    keras.utils.set_random_seed(cfg.seed)  # the real model starts where it would have without the probe


def build_model(cfg, info, state, paths):
    """The compiled U-Net; on resume, with the weights and optimizer state of last.keras."""
    import keras

    import unet
    model = new_model(unet, cfg)
    unet.compile_model(model, cfg.loss, cfg.lr, info["jit"], ema=cfg.ema)
    if cfg.init and not state["epoch"]:  # weights only: fine-tuning starts a fresh optimizer
        try:
            model.set_weights(keras.models.load_model(cfg.init, compile=False).get_weights())
        except Exception as e:
            raise common.Error(f"--init {cfg.init}", f"cannot start from its weights ({common.one_line(e)})") from None
    if state["epoch"]:
        model.optimizer.build(model.trainable_variables)
        try:
            model.load_weights(paths["last"])
        except Exception as e:  # its state entry reads, its weights do not: damaged or edited by hand
            raise common.Error(paths['last'], f"cannot load its weights to resume ({common.one_line(e)}); "
                             "rerun with --fresh to start over") from None
    return model


def repair_after_kill(model, cfg, state, paths, writes):
    """A kill between the commit (last.keras) and the end of on_epoch_end can leave state.json, log.csv
    or best.keras one epoch behind: rewrite them from last.keras (its state, or the model loaded from it).
    Reads `paths`, writes `writes` (the same, but for processes 1.. of a cluster: see train)."""
    atomic_write_text(writes["state"], json.dumps(state, indent=1))
    write_log(writes["log"], state["history"])
    best = read_state(paths["best"]) if os.path.exists(paths["best"]) else None
    if state["best"] and state["best"]["epoch"] == state["epoch"] \
            and (best is None or best["epoch"] != state["best"]["epoch"]):
        save_best(model, cfg, writes, state)


def summarize(state, paths, t_fit):
    rates = [r["images_per_sec"] for r in state["history"]]
    best = state["best"] or {}
    return {"epochs_done": state["epoch"], "best_epoch": best.get("epoch"), "val_dice": best.get("val_dice"),
            "val_iou": best.get("val_iou"),
            "images_per_sec": float(np.median(rates[1:] or rates)) if rates else None,
            "train_seconds": round(time.time() - t_fit, 1), "stopped": state["stopped"],
            "diverged": state["diverged"], "files": [paths[k] for k in ("best", "last", "log", "curves", "run")]}


def run_paths(out):
    return {k: os.path.join(out, f) for k, f in
            [("best", "best.keras"), ("last", "last.keras"), ("log", "log.csv"), ("run", "run.json"),
             ("state", "state.json"), ("curves", "curves.png")]}


def train(cfg):
    """Train with a dict / Namespace / argv list of flags; returns the summary dict (also in run.json).
    In a run over several processes (cluster_of), only process 0 writes files and prints epochs."""
    cfg = config_of(cfg)
    out = cfg.out
    cluster = cluster_of()
    chief = cluster is None or cluster.index == 0
    if chief:
        check_writable(out)
    paths = run_paths(out)

    keras = common.import_keras()  # after the flag checks, so bad input fails fast
    if cluster:
        check_cluster(cfg, cluster, keras.backend.backend())
        join_cluster(cluster, cfg.cluster_timeout)  # before JAX computes anything, the seed included

    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    strategy, info = setup_backend(cfg, cluster)
    scope = strategy.scope if strategy else contextlib.nullcontext  # a fresh context each time
    # Processes 1.. of a cluster take every step process 0 takes (saving a model is a collective step),
    # but save into a scratch folder of their own; they read the run (resume) from the shared --out.
    writes = paths if chief else run_paths(tempfile.mkdtemp(prefix=f"skin-unet-process{cluster.index}-"))
    try:
        cfg.precision = info["precision"]
        state = resume_or_start(cfg, cfg.identity(), paths, chief)
        train_batches, val_batches, data_summary, per_source = load_data(cfg, info, state["epoch"])
        settle_jit(cfg, info, state, train_batches)
        with scope():
            model = build_model(cfg, info, state, paths)
            if state["epoch"]:
                repair_after_kill(model, cfg, state, paths, writes)
                if chief:
                    print(f"resuming {out} after epoch {state['epoch']}", flush=True)
        run = {**asdict(cfg), "data_summary": data_summary, **info, "params": model.count_params(),
               "model": model.name, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "result": None}
        atomic_write_text(writes["run"], json.dumps(run, indent=1))

        t_fit = time.time()
        if not (state["epoch"] >= cfg.epochs or state["stopped"]):
            if chief:
                devices = f" on {info['processes']} processes, {info['replicas']} devices" if cluster else ""
                print(f"training {model.name} ({model.count_params() / 1e6:.2f} M params){devices} on "
                      f"{data_summary['train']} images, validating on {data_summary['val']}, {cfg.size} px, batch "
                      f"{cfg.batch}; {info['backend']} {info['accelerator']} {info['precision']} jit={info['jit']} "
                      f"({info['jit_reason']}) distribute={info['distribute']}"
                      f"{'; augmenting on the ' + info['augment_on'] if info['augment_on'] else ''}"
                      f"{'; sources balanced' if cfg.balance else ''}"
                      f"{'; weights averaged, EMA ' + str(cfg.ema) if cfg.ema else ''}"
                      f"{'; starting from ' + cfg.init if cfg.init else ''}", flush=True)
            verbose = 0 if not chief else cfg.verbose if cfg.verbose is not None else int(sys.stdout.isatty())
            workers = cfg.workers or os.cpu_count() or 1
            warp = device_warp(train_batches) if info["augment_on"] == "device" else None
            with scope():
                model.fit(feed(train_batches, workers, warp),
                          validation_data=None if per_source else feed(val_batches, workers),
                          epochs=cfg.epochs, initial_epoch=state["epoch"], verbose=verbose,
                          callbacks=[*([keras.callbacks.SwapEMAWeights()] if cfg.ema and not per_source else []),
                                     make_epoch_callback(cfg, state, len(train_batches), writes, per_source, chief),
                                     *(tensorboard(cfg) if chief else [])])
    finally:
        if info["distribute"] == "data_parallel":
            keras.distribution.set_distribution(None)
        keras.mixed_precision.set_global_policy("float32")
        if not chief:
            shutil.rmtree(os.path.dirname(writes["run"]), ignore_errors=True)

    run["result"] = summarize(state, paths, t_fit)
    run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if chief:
        atomic_write_text(paths["run"], json.dumps(run, indent=1))
    return {**run["result"], "chief": chief}


def print_summary(s):
    if s["diverged"]:
        print(f"stopped: training diverged ({s['diverged']}); the last good epoch is kept", flush=True)
    elif s["stopped"]:
        print(f"stopped: {s['stopped']}", flush=True)
    if s["best_epoch"]:
        print(f"best epoch {s['best_epoch']} of {s['epochs_done']}: val Dice {s['val_dice']:.4f}, "
              f"val IoU {s['val_iou']:.4f}; {s['images_per_sec']:.1f} images/s (training batches)", flush=True)
    print("files: " + ", ".join(f for f in s["files"] if os.path.exists(f)), flush=True)


@functools.partial(common.command, interrupted="interrupted: rerun the same command to resume after the last "
                                             "finished epoch")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.plot:
        return plot_command(args)
    cluster = cluster_of()
    if cluster and WORKER_ENV not in os.environ:
        return supervise(argv, cluster, args.cluster_timeout)
    try:
        summary = train(args)
    except Exception as e:  # a collective that fails because a peer is gone: one line, not a traceback
        if cluster and any(mark in str(e) for mark in PEER_LOST):
            raise peer_lost(cluster, args.cluster_timeout) from None
        raise
    if summary["chief"]:
        print_summary(summary)
    return 1 if summary["diverged"] else 0  # diverged: a failure during the run


if __name__ == "__main__":
    sys.exit(main())
