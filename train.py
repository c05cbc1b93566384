"""Train the U-Net on ISIC-style skin-lesion data (the built-in synthetic set without --data).

    python train.py --data data/isic2018 --size 128 --epochs 20
    python evaluate.py --weights best.keras

Writes in --out: best.keras, last.keras (model, optimizer and resume state), log.csv, curves.png,
run.json and state.json (README). Kill it at any moment and rerun the same command: it resumes
after the last finished epoch. Read top to bottom: the settings (Config), the files, the jobs at
each epoch's end, then train(). Optional parts live in extras/ (docs/training.md).
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, fields

import numpy as np

import common
import data

STATE_ENTRY = "skin_unet_state.json"  # extra entry inside last.keras; Keras ignores unknown entries
LOG_FIELDS = ["epoch", "loss", "dice", "iou", "val_loss", "val_dice", "val_iou", "lr",
              "images_per_sec", "seconds"]
MIN_LR_FACTOR = 0.01  # cosine decays to 1% of --lr; plateau never goes below it either
PLATEAU_PATIENCE, PLATEAU_FACTOR = 3, 0.5
CLUSTER_VARS = ("KERAS_DISTRIBUTION_NUM_PROCESSES", "SLURM_NTASKS")  # extras/cluster.py reads them


# --- the settings: each field is a flag; its metadata is the flag's help ------------------------
def setting(default, help=None, run=False, flag=None, **argparse_kw):
    """A Config field and its flag (--name, or `flag`). run=True: the setting defines the run, so a
    rerun into the same --out with another value is refused (the weights would have another shape,
    or the data stream another order), unless --fresh. The type comes from the annotation."""
    meta = {"defines_run": run, "help": help, "flag": flag, "argparse": argparse_kw}
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class Config:
    """Every setting of a training run: its default, flag and one-line help (parser() reads them
    here; docs/training.md says more about each)."""
    data: list = setting(None, "data folder; repeat to train on several (default: synthetic)",
                         run=True, action="append")
    balance: bool = setting(False, "with several --data: draw each source equally often", run=True)
    init: str = setting(None, "start from the weights of this .keras (same shape)", run=True)
    epochs: int = setting(40, "epochs (with --minutes: the most)")
    minutes: float = setting(0.0, "fit the schedule into M minutes of wall clock, its length set "
                             "after the first epoch (0: off)", metavar="M")
    size: int = setting(256, "square input size in pixels, a multiple of 2**depth", run=True)
    batch: int = setting(16, run=True)
    filters: int = setting(12, "filters of the first level, doubling per level", run=True)
    depth: int = setting(4, "number of poolings", run=True)
    lr: float = setting(1e-3, run=True)
    seed: int = setting(0, run=True)
    out: str = setting(None, "output folder (default: here)")
    loss: str = setting("bce_dice", run=True, choices=["bce_dice", "dice", "bce", "bce_lovasz"])
    ema: float = setting(0.0, "validate and save a moving average of the weights (0: off)",
                         run=True)
    upsample: str = setting("transpose", "decoder up-sampling", run=True,
                            choices=["transpose", "matmul"])
    pool: str = setting("max", "encoder down-sampling", run=True, choices=["max", "reshape"])
    encoder: str = setting("none", run=True, choices=["none", "mobilenetv3", "mobilenetv3small",
                                                      "efficientnetb0", "resnet50"])
    encoder_weights: str = setting("none", run=True, choices=["imagenet", "none"])
    precision: str = setting("auto", "auto: mixed_bfloat16 on a GPU/TPU, float32 on CPU", run=True,
                             choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"])
    jit: str = setting("auto", "XLA", choices=["auto", "on", "off"])
    distribute: str = setting("auto", "over several devices or processes",
                              choices=["auto", "none", "mirrored", "data_parallel"])
    cluster_timeout: int = setting(300, "several processes: seconds to wait for the others",
                                   metavar="S")
    patience: int = setting(10, "early stopping after N epochs without val Dice gain; 0: off")
    schedule: str = setting("cosine", run=True, choices=["cosine", "plateau"])
    val_fraction: float = setting(0.1, run=True)
    test_fraction: float = setting(0.1, run=True)
    augment: bool = setting(True, run=True, flag="--no-augment")
    augment_on: str = setting("auto", "where augmentation's pixel work runs",
                              choices=["auto", "host", "device"])
    steps_per_epoch: int = setting(0, "cap training batches per epoch (0: all)", run=True)
    workers: int = setting(0, "batch-loading threads (0: all cores)")
    cache: str = setting(None, "array cache folder (default: $SKIN_UNET_CACHE or "
                         "~/.cache/skin-unet)")
    fresh: bool = setting(False, "discard an earlier run in OUT instead of resuming it")
    verbose: int = setting(None, "Keras progress: 1 bar, 2 one line (default: 1 on a terminal)",
                           choices=[0, 1, 2])
    tensorboard: str = setting(None, "also write TensorBoard event files to DIR", metavar="DIR")
    plot: list = setting(None, "only draw curves.png from RUN/log.csv (several: one picture)",
                         nargs="+", metavar="RUN")

    def identity(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["defines_run"]}


def parser():
    """The command line, made from Config's fields (type from the annotation; bool: a switch)."""
    p = common.ArgumentParser(description="Train the skin-lesion U-Net.",
                              epilog="More on each flag: docs/training.md.")
    for f in fields(Config):
        kw = {"dest": f.name, "default": f.default, "help": f.metadata["help"],
              **f.metadata["argparse"]}
        if f.type is bool:  # on with its flag, or off with --no-<name>
            kw["action"] = "store_false" if f.default else "store_true"
        elif f.type in (int, float):
            kw["type"] = f.type
        p.add_argument(f.metadata["flag"] or "--" + f.name.replace("_", "-"), **kw)
    return p


def config_of(args):
    """A validated Config from an argv list or parser()'s Namespace; common.Error: exit 2."""
    if isinstance(args, (list, tuple)):
        args = parser().parse_args(list(args))
    if not isinstance(args, argparse.Namespace):
        raise TypeError(f"config_of takes an argv list or an argparse.Namespace, not {args!r}")
    cfg = Config(**vars(args))
    for key in ("epochs", "batch", "filters", "depth"):
        if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 1:
            raise common.Error(f"--{key} {getattr(cfg, key)!r}", "must be a positive integer")
    for key in ("patience", "steps_per_epoch", "workers"):
        if getattr(cfg, key) < 0:
            raise common.Error(f"--{key.replace('_', '-')} {getattr(cfg, key)}", "must be >= 0")
    if not cfg.lr > 0:
        raise common.Error(f"--lr {cfg.lr}", "must be > 0")
    if not cfg.minutes >= 0:
        raise common.Error(f"--minutes {cfg.minutes}", "must be >= 0 (0: off)")
    if not 0 <= cfg.ema < 1:
        raise common.Error(f"--ema {cfg.ema}", "must be in [0, 1) (0: off)")
    if not (0 <= cfg.val_fraction < 1 and 0 <= cfg.test_fraction < 1
            and cfg.val_fraction + cfg.test_fraction < 1):
        raise common.Error(f"--val-fraction {cfg.val_fraction} / --test-fraction "
                           f"{cfg.test_fraction}", "each in [0, 1) and together < 1")
    depth = cfg.depth if cfg.encoder == "none" else 5
    if not (isinstance(cfg.size, int) and cfg.size > 0 and cfg.size % 2 ** depth == 0):
        extra = "" if cfg.encoder == "none" else f" (encoder {cfg.encoder} has 5 strides)"
        raise common.Error(f"--size {cfg.size}",
                           f"must be a multiple of 2**depth = {2 ** depth}{extra}")
    cfg.data = data_value(cfg.data)
    if cfg.balance and len(cfg.data or []) < 2:
        raise common.Error("--balance", "needs two or more --data folders")
    if cfg.init is not None:
        from extras import warm_start
        cfg.init = warm_start.check(cfg.init)
    cfg.out = os.path.abspath(cfg.out or ".")
    if cfg.tensorboard:
        from extras import curves
        cfg.tensorboard = curves.check_tensorboard(cfg.tensorboard)
    return cfg


def data_value(value):
    """--data as stored: None (synthetic) or a list of absolute paths (data.folders_of also reads
    the single path of runs from before several folders were possible)."""
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


# --- files, always written to a temp file beside the target and renamed into place -------------
def run_paths(out):
    return {k: os.path.join(out, f) for k, f in
            [("best", "best.keras"), ("last", "last.keras"), ("log", "log.csv"),
             ("run", "run.json"), ("state", "state.json"), ("curves", "curves.png")]}


def write_text(path, text):
    common.atomic_write(path, lambda f: f.write(text.encode()))


def write_log(path, rows):
    """log.csv. Per-source columns (val_dice_<name>) exist only with 2+ sources; rows carry them."""
    names = LOG_FIELDS + [k for k in (rows[0] if rows else {}) if k not in LOG_FIELDS]

    def cell(v):
        return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)

    lines = [",".join(names)] + [",".join(cell(r.get(k)) for k in names) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def save_model(model, path, state=None):
    """model.save to a temp .keras, add the resume state as an extra zip entry, fsync, rename."""
    with common.atomic_path(path, ".keras") as tmp:
        model.save(tmp)
        if state is not None:
            with zipfile.ZipFile(tmp, "a") as z:
                z.writestr(STATE_ENTRY, json.dumps(state))


def read_state(path):
    """The resume state stored inside a .keras file, or None."""
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read(STATE_ENTRY))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError):
        return None


def averaged(model, cfg):
    """The weights validated: with --ema their moving average, swapped in for the duration
    (extras/ema.py), else the trained weights as they are."""
    if not cfg.ema:
        return contextlib.nullcontext()
    from extras import ema
    return ema.averaged(model)


def save_best(model, cfg, paths, state):
    """best.keras holds the weights validated: last.keras as committed, or --ema's average."""
    if cfg.ema:
        with averaged(model, cfg):
            save_model(model, paths["best"], state)
    elif os.path.exists(paths["last"]):  # (a cluster's process 1.. repairing before its 1st save)
        with common.atomic_path(paths["best"]) as tmp:
            shutil.copyfile(paths["last"], tmp)


# --- what an epoch means for the run --------------------------------------------------------------
def epoch_decision(state, row, cfg):
    """What one epoch's log row means for the run, as the state entries it changes (a pure function:
    no Keras, no files). A non-finite loss or val_loss: "diverged" says so and nothing else changes.
    Otherwise the epoch is appended; a better val Dice (the loss, without validation) becomes "best"
    and resets the waits; else they grow, the plateau schedule halves the lr (not below
    MIN_LR_FACTOR of --lr) every PLATEAU_PATIENCE epochs, and --patience epochs without a gain set
    "stopped"."""
    if not all(math.isfinite(row[k]) for k in ("loss", "val_loss") if row.get(k) is not None):
        return {"diverged": f"loss {row['loss']} / val_loss {row.get('val_loss')} at epoch "
                            f"{row['epoch']}", "stopped": state["stopped"]}
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
    budget = state.get("budget")  # --minutes (extras/budget.py)
    if budget and new["epoch"] >= budget["epochs"] and not new["stopped"]:
        new["stopped"] = f"the --minutes {budget['minutes']:g} budget: {budget['epochs']} epochs"
    return new


def planned_epochs(cfg, state):
    """The run's length: --epochs, or the epochs --minutes found to fit."""
    return state["budget"]["epochs"] if state.get("budget") else cfg.epochs


def cosine_lr(cfg, epoch, epochs=None):
    lo, epochs = cfg.lr * MIN_LR_FACTOR, epochs or cfg.epochs
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * epoch / max(epochs, 1)))


# --- the per-epoch jobs: small steps in order, sharing one Run ------------------------------------
@dataclass
class Run:
    """What the jobs at each epoch's end share."""
    cfg: Config
    state: dict  # the resume state, committed inside last.keras
    paths: dict  # where this process writes (a cluster's processes 1..: a scratch folder)
    model: object
    chief: bool = True  # the process that prints and writes the run's files: one of one, or 0
    per_source: object = None  # extras.sources.PerSource with 2+ --data sources, else None
    row: dict = None  # this epoch's log row
    improved: bool = False  # this epoch is the best so far
    draw: bool = True  # curves.png (off after the first failure)
    started: float = 0.0  # time.time() as fit starts: --minutes counts from there


def decide(run):
    """The schedule's, early stopping's and the NaN guard's decision (epoch_decision)."""
    decided = epoch_decision(run.state, run.row, run.cfg)
    run.state.update(decided)
    if decided["diverged"] or decided["stopped"]:
        run.model.stop_training = True
    best = run.state["best"]
    run.improved = best is not None and best["epoch"] == run.row["epoch"]


def checkpoint(run):
    """The commit point: last.keras holds weights, optimizer and state together. A kill before it
    replays the epoch; after it, the files the later jobs write are repaired on resume."""
    save_model(run.model, run.paths["last"], run.state)
    if run.improved:
        save_best(run.model, run.cfg, run.paths, run.state)


def write_logs(run):
    write_text(run.paths["state"], json.dumps(run.state, indent=1))
    write_log(run.paths["log"], run.state["history"])
    if run.draw:  # curves.png; after a failure (no matplotlib, a full disk) no more
        from extras import curves
        run.draw = curves.redraw(run.paths["curves"], run.state["history"])


def report(run):
    row = run.row
    names = ("loss", "val_loss", "val_dice", "val_iou", *(k for k in row if "val_dice_" in k))
    scores = "  ".join(f"{k} {row[k]:.4f}" for k in names if row[k] is not None)
    print(f"epoch {row['epoch']}/{run.cfg.epochs}: {scores}  lr {row['lr']:.2e}  "
          f"{row['images_per_sec']:.1f} img/s{'  *best' if run.improved else ''}", flush=True)


def epoch_end(run, steps):
    """The Keras callback that ends every epoch: the lr at its start, images/s from its second step
    (the first includes compiling and the feed's start-up), then the jobs, in this order. Only
    epoch-level hooks and on_train_batch_begin: no per-step host syncs."""
    import keras
    cfg = run.cfg

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.lr = run.state["lr"]
            if cfg.schedule == "cosine":
                self.lr = cosine_lr(cfg, epoch, planned_epochs(cfg, run.state))
            self.model.optimizer.learning_rate = self.lr
            self.t_begin, self.t_second, self.t_end = time.perf_counter(), None, None
            self.second = self.calls = 0

        def on_train_batch_begin(self, batch, logs=None):
            self.calls += 1
            if self.calls == 2:
                self.t_second, self.second = time.perf_counter(), batch

        def on_test_begin(self, logs=None):
            if self.t_end is None:  # fit's validation starts: training batches are done (synced)
                self.t_end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            now = time.perf_counter()
            t_end = self.t_end or now
            if self.t_second is not None and steps > self.second:
                ips = (steps - self.second) * cfg.batch / max(t_end - self.t_second, 1e-9)
            else:
                ips = steps * cfg.batch / max(t_end - self.t_begin, 1e-9)
            run.row = {"epoch": epoch + 1, "lr": float(self.lr), "images_per_sec": round(ips, 2),
                       "seconds": round(now - self.t_begin, 2)}
            for k in ("loss", "dice", "iou", "val_loss", "val_dice", "val_iou"):
                run.row[k] = float(logs[k]) if k in logs else None
            if run.per_source:  # fit did not validate: validate all and per source (extras)
                from extras import sources
                with averaged(self.model, cfg):
                    run.row.update(sources.validate(self.model, cfg, run.per_source))
                run.row["seconds"] = round(time.perf_counter() - self.t_begin, 2)
            if cfg.minutes and "budget" not in run.state:
                # An epoch without the first step's compile: this one, its training part at the
                # measured images/s.
                steady = run.row["seconds"] - (t_end - self.t_begin) + steps * cfg.batch / ips
                from extras import budget
                run.state["budget"] = budget.plan(cfg.minutes, time.time() - run.started, steady,
                                                  cfg.epochs)
                if run.chief:
                    b = run.state["budget"]
                    print(f"--minutes {cfg.minutes:g}: {b['epochs']} epochs of about "
                          f"{b['epoch_seconds']:.1f} s fit the budget", flush=True)
            decide(run)
            if run.state["diverged"]:  # NaN guard: keep the last good checkpoint, commit nothing
                return
            checkpoint(run)
            if run.chief:  # saving a model is collective (above); the rest is process 0's alone
                write_logs(run)
                report(run)
            # TensorBoard (after this callback) logs what fit put in logs; add what only this knows.
            logs.update({k: v for k, v in run.row.items() if "val_" in k and v is not None})

    return EpochEnd()


# --- train(): resume or start, data, model, fit ---------------------------------------------------
def resume_or_start(cfg, identity, paths, chief=True):
    """The state of the run in --out when it has this configuration (extras/resume.py), else a
    fresh one. --fresh deletes the old run's files (process 0 only; the others ignore them)."""
    if cfg.fresh and chief:
        for k in ("last", "state", "log", "best", "curves"):  # (run.json is rewritten before fit)
            if os.path.exists(paths[k]):
                os.remove(paths[k])
    state = None if cfg.fresh else read_state(paths["last"])
    if state is not None:
        from extras import resume
        resume.check_same_run(state, identity, Config().identity(), paths["last"])
    else:
        state = {"version": 1, "config": identity, "epoch": 0, "best": None, "wait": 0,
                 "plateau_wait": 0, "lr": cfg.lr, "history": [], "stopped": None}
    state["diverged"] = None
    return state


def load_data(cfg, runtime, epoch):
    """(training batches, validation batches, summary for run.json, PerSource or None). Several
    --data: each split by its own rules, validated per source (extras/sources.py). Fails with one
    line on a missing or empty folder, before any model is built."""
    from extras import runtime as rt

    t0 = time.time()
    kw = {"size": cfg.size, "cache": cfg.cache, "progress": sys.stderr.isatty(),
          "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction}
    train_set = data.load_split(cfg.data, "train", **kw)
    val_set = data.load_split(cfg.data, "val", **kw)
    # part: over several processes, each one's Batches give it its part of every batch
    batches = {"augment": cfg.augment, "seed": cfg.seed, "epoch": epoch, "drop_remainder": True,
               "steps": cfg.steps_per_epoch, "part": (runtime.process, runtime.processes)}
    if cfg.balance:
        from extras import sources
        spans = [(s["start"], s["stop"]) for s in train_set.sources]
        train = sources.Balanced(train_set.images, train_set.masks, cfg.batch, spans, **batches)
    else:
        train = data.Batches(train_set.images, train_set.masks, cfg.batch, **batches)
    val_images, val_masks = rt.split_evenly(val_set.images, val_set.masks, runtime.replicas)
    val = data.Batches(val_images, val_masks, cfg.batch, augment=False, shuffle=False,
                       part=batches["part"])
    problems = train_set.problems + [p for p in val_set.problems if p not in train_set.problems]
    names = data.source_names([s["path"] for s in val_set.sources])
    summary = {"path": cfg.data, "synthetic": cfg.data is None, "train": len(train_set.pairs),
               "val": len(val_set.pairs), "problems": problems,
               "load_seconds": round(time.time() - t0, 1),
               "sources": [{"name": name, "path": tr["path"], "layout": tr["layout"],
                            "train": tr["stop"] - tr["start"], "val": va["stop"] - va["start"]}
                           for name, tr, va in zip(names, train_set.sources, val_set.sources)]}
    if cfg.data is None:
        from extras import synthetic
        summary["path"] = synthetic.synthetic_dir(cache=cfg.cache)
    per_source = None
    if len(names) > 1:
        from extras import sources
        per_source = sources.per_source(val_set, val_images, val_masks)
    return train, val, summary, per_source


def new_model(cfg):
    import unet
    return unet.build_unet(cfg.size, cfg.filters, cfg.depth, upsample=cfg.upsample, pool=cfg.pool,
                           encoder=None if cfg.encoder == "none" else cfg.encoder,
                           encoder_weights=None if cfg.encoder_weights == "none"
                           else cfg.encoder_weights)


def build_model(cfg, jit, state, paths):
    """The compiled U-Net; on resume, with the weights and optimizer state of last.keras."""
    import unet
    model = unet.compile_model(new_model(cfg), cfg.loss, cfg.lr, jit, ema=cfg.ema)
    if cfg.init and not state["epoch"]:  # weights only: fine-tuning starts a fresh optimizer
        from extras import warm_start
        warm_start.load_weights(model, cfg.init)
    if state["epoch"]:
        from extras import resume
        resume.load_weights(model, paths["last"])
    return model


def repair_after_kill(model, cfg, state, paths, writes):
    """A kill between the commit (last.keras) and the end of the epoch's jobs can leave state.json,
    log.csv or best.keras one epoch behind: rewrite them from last.keras (its state, or the model
    loaded from it). Reads `paths`, writes `writes`."""
    write_text(writes["state"], json.dumps(state, indent=1))
    write_log(writes["log"], state["history"])
    best = read_state(paths["best"]) if os.path.exists(paths["best"]) else None
    if state["best"] and state["best"]["epoch"] == state["epoch"] \
            and (best is None or best["epoch"] != state["best"]["epoch"]):
        save_best(model, cfg, writes, state)


def feed(batches, workers, get=None):
    """data.Batches as a keras.utils.PyDataset: fit's worker threads call batches[i] in parallel
    (augmentation is Pillow C code that releases the GIL, and threads share the arrays for free).
    get(i): batch i another way (extras/device_augment.py: warped on the accelerator)."""
    import keras
    get = get or batches.__getitem__

    class Feed(keras.utils.PyDataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, index):
            return get(index)

        def on_epoch_end(self):
            batches.on_epoch_end()

    return Feed(workers=workers, max_queue_size=16)


def cluster_place():
    """This process's place in a run over several processes (extras/cluster.py), or None."""
    if not any(name in os.environ for name in CLUSTER_VARS):
        return None
    from extras import cluster
    return cluster.cluster_of()


def train(args):
    """Train with an argv list or parser()'s Namespace; returns the summary (also in run.json)."""
    cfg = config_of(args)
    place = cluster_place()
    chief = place is None or place.index == 0
    if chief:
        check_writable(cfg.out)
    paths = run_paths(cfg.out)
    keras = common.import_keras()  # after the flag checks, so bad input fails fast
    from extras import runtime as rt
    if place:
        from extras import cluster
        cluster.join(cfg, place, keras.backend.backend())
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    scope, runtime = rt.setup(cfg, place)
    scratch = cluster.scratch(place) if place else None  # processes 1.. of a cluster write there
    writes = run_paths(scratch) if scratch else paths
    try:
        cfg = dataclasses.replace(cfg, precision=runtime.precision)
        state = resume_or_start(cfg, cfg.identity(), paths, chief)
        train_batches, val_batches, data_summary, per_source = load_data(cfg, runtime,
                                                                         state["epoch"])
        planned = max(planned_epochs(cfg, state) - state["epoch"], 0) * len(train_batches)
        runtime = rt.settle_jit(runtime, cfg, planned, train_batches[0], lambda: new_model(cfg))
        with scope():
            model = build_model(cfg, runtime.jit, state, paths)
            if state["epoch"]:
                repair_after_kill(model, cfg, state, paths, writes)
                if chief:
                    print(f"resuming {cfg.out} after epoch {state['epoch']}", flush=True)
        run_record = {**dataclasses.asdict(cfg), "data_summary": data_summary, **runtime.record(),
                      "params": model.count_params(), "model": model.name,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "result": None}
        write_text(writes["run"], json.dumps(run_record, indent=1))

        t_fit = time.time()
        if not (state["epoch"] >= cfg.epochs or state["stopped"]):
            if chief:
                print(start_line(cfg, runtime, model, data_summary), flush=True)
            get = None
            if runtime.augment_on == "device":
                from extras import device_augment
                get = device_augment.device_batches(train_batches)
            run = Run(cfg, state, writes, model, chief, per_source, started=t_fit)
            callbacks = [epoch_end(run, len(train_batches))]
            if cfg.ema and not per_source:  # fit validates the average (per source: averaged)
                callbacks.insert(0, keras.callbacks.SwapEMAWeights())
            if cfg.tensorboard and chief:
                from extras import curves
                callbacks.append(curves.tensorboard(cfg.tensorboard))
            verbose = cfg.verbose if cfg.verbose is not None else int(sys.stdout.isatty())
            workers = cfg.workers or os.cpu_count() or 1
            with scope():
                model.fit(feed(train_batches, workers, get),
                          validation_data=None if per_source else feed(val_batches, workers),
                          epochs=cfg.epochs, initial_epoch=state["epoch"],
                          verbose=verbose if chief else 0, callbacks=callbacks)
    finally:
        rt.reset(runtime)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    run_record["result"] = summarize(state, paths, t_fit)
    run_record["budget"] = state.get("budget")  # --minutes' decision, or None
    if chief and os.path.exists(paths["best"]):  # stored with the model: predict.py flags by it
        from extras import review
        run_record["review_threshold"] = review.review_threshold_of(paths["best"],
                                                                    val_batches.images)
    run_record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if chief:
        write_text(paths["run"], json.dumps(run_record, indent=1))
    return {**run_record["result"], "chief": chief}


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


def summarize(state, paths, t_fit):
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


@functools.partial(common.command, interrupted="interrupted: rerun the same command to resume "
                                               "after the last finished epoch")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.plot:
        from extras import curves
        return curves.plot_command(args)
    place = cluster_place()
    if place:  # one of several processes: it supervises a child that trains (extras/cluster.py)
        from extras import cluster
        return cluster.main(lambda: finish(train(args)), __file__, argv, place,
                            args.cluster_timeout)
    return finish(train(args))


if __name__ == "__main__":
    sys.exit(main())
