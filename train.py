"""Train the U-Net on ISIC-style skin-lesion data (the built-in synthetic set without --data).

    python train.py --data data/isic2018 --size 128 --epochs 20
    python evaluate.py --weights best.keras

Writes in --out: best.keras, last.keras (model, optimizer and resume state), log.csv, curves.png,
run.json and state.json (README). Kill it at any moment and rerun the same command: it resumes
after the last finished epoch. Read top to bottom: the settings (Config), the files, the jobs at
each epoch's end, then train(). Optional parts live in extras/ (docs/training.md).
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass, fields

import common
import data

STATE_ENTRY = "skin_unet_state.json"  # extra entry inside last.keras; Keras ignores unknown entries
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
    """Every setting of a run: default, flag and help (parser() reads them; docs/training.md)."""
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
    """--data as stored: None (synthetic) or a list of absolute paths."""
    folders = []
    for folder in data.folders_of(value):
        if not os.path.isdir(folder):
            raise common.Error(folder, "data folder not found")
        folder = os.path.abspath(folder)
        if folder in folders:  # the same images twice would weigh one set double, silently
            raise common.Error(f"--data {folder}", "given twice")
        folders.append(folder)
    return folders or None


# --- files, always written to a temp file beside the target and renamed into place -------------
def run_paths(out):
    return {k: os.path.join(out, f) for k, f in
            [("best", "best.keras"), ("last", "last.keras"), ("log", "log.csv"),
             ("run", "run.json"), ("state", "state.json"), ("curves", "curves.png")]}


def write_text(path, text):
    common.atomic_write(path, lambda f: f.write(text.encode()))


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


def save_best(model, cfg, paths, state):
    """best.keras holds the weights validated: last.keras as committed, or --ema's average."""
    if cfg.ema:
        from extras import ema
        with ema.averaged(model):
            save_model(model, paths["best"], state)
    elif os.path.exists(paths["last"]):  # (a cluster's process 1.. repairing before its 1st save)
        with common.atomic_path(paths["best"]) as tmp:
            shutil.copyfile(paths["last"], tmp)


# --- what an epoch means for the run --------------------------------------------------------------
def epoch_decision(state, row, cfg):
    """What one epoch's log row means for the run, as the state entries it changes (a pure function:
    no Keras, no files). A non-finite loss or val_loss: "diverged", and nothing else changes. A
    better score (val Dice, or minus the loss without validation) becomes "best"; else the plateau
    schedule halves the lr every PLATEAU_PATIENCE epochs, and --patience epochs set "stopped"."""
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


# --- the per-epoch jobs: small steps in order, on one Run -----------------------------------------
@dataclass
class Run:
    """What the jobs at each epoch's end share, and the jobs."""
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

    def decide(self):
        """The schedule's, early stopping's and the NaN guard's decision (epoch_decision)."""
        decided = epoch_decision(self.state, self.row, self.cfg)
        self.state.update(decided)
        if decided["diverged"] or decided["stopped"]:
            self.model.stop_training = True
        best = self.state["best"]
        self.improved = best is not None and best["epoch"] == self.row["epoch"]

    def checkpoint(self):
        """The commit point: last.keras holds weights, optimizer and state together. A kill before
        it replays the epoch; after it, the files the later jobs write are repaired on resume."""
        save_model(self.model, self.paths["last"], self.state)
        if self.improved:
            save_best(self.model, self.cfg, self.paths, self.state)

    def write_logs(self):
        from extras import curves  # log.csv is written beside where it is read and drawn
        write_text(self.paths["state"], json.dumps(self.state, indent=1))
        curves.write_log(self.paths["log"], self.state["history"])
        if self.draw:  # curves.png; after a failure (no matplotlib, a full disk) no more
            self.draw = curves.redraw(self.paths["curves"], self.state["history"])


def epoch_end(run, steps):
    """The Keras callback around every epoch: the lr at its start, its clock, then the jobs."""
    import keras

    from extras import report
    cfg = run.cfg

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.lr = run.state["lr"]
            if cfg.schedule == "cosine":
                self.lr = cosine_lr(cfg, epoch, planned_epochs(cfg, run.state))
            self.model.optimizer.learning_rate = self.lr
            self.clock = report.EpochClock()

        def on_train_batch_begin(self, batch, logs=None):
            self.clock.batch_begins(batch)

        def on_test_begin(self, logs=None):
            self.clock.validation_begins()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            trained, ips = self.clock.training(steps, cfg.batch)
            run.row = {"epoch": epoch + 1, "lr": float(self.lr), "images_per_sec": round(ips, 2),
                       "seconds": self.clock.seconds()}
            for k in ("loss", "dice", "iou", "val_loss", "val_dice", "val_iou"):
                run.row[k] = float(logs[k]) if k in logs else None
            if run.per_source:  # fit did not validate: validate all and per source (extras)
                from extras import sources
                run.row.update(sources.validate(self.model, cfg, run.per_source))
                run.row["seconds"] = self.clock.seconds()
            if cfg.minutes and "budget" not in run.state:
                from extras import budget
                budget.plan_once(run, trained, steps * cfg.batch / ips)
            run.decide()
            if run.state["diverged"]:  # NaN guard: keep the last good checkpoint, commit nothing
                return
            run.checkpoint()
            if run.chief:  # saving a model is collective (above); the rest is process 0's alone
                run.write_logs()
                print(report.epoch_line(run.row, cfg.epochs, run.improved), flush=True)
            # TensorBoard (after this callback) logs what fit put in logs; add what only this knows.
            logs.update({k: v for k, v in run.row.items() if "val_" in k and v is not None})

    return EpochEnd()


# --- train(): resume or start, data, model, fit ---------------------------------------------------
def resume_or_start(cfg, identity, paths, chief=True):
    """The state of the run in --out when it has this configuration (extras/resume.py), else a
    fresh one. --fresh deletes the old run's files (process 0 only; the others ignore them)."""
    if cfg.fresh and chief:
        from extras import resume
        resume.discard(paths)
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
    """(training batches, validation batches, run.json's data summary, PerSource or None)."""
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
    from extras import report  # run.json's account of the data
    summary = report.data_summary(cfg, train_set, val_set, time.time() - t0)
    per_source = None
    if len(val_set.sources) > 1:
        from extras import sources
        per_source = sources.per_source(val_set, val_images, val_masks)
    return train, val, summary, per_source


def new_model(cfg):
    import unet
    return unet.build_unet(cfg.size, cfg.filters, cfg.depth, upsample=cfg.upsample, pool=cfg.pool,
                           encoder=None if cfg.encoder == "none" else cfg.encoder,
                           encoder_weights=None if cfg.encoder_weights == "none"
                           else cfg.encoder_weights)


def build_model(cfg, jit, state, paths, writes):
    """The compiled U-Net; on resume, with last.keras's weights and optimizer (extras/resume.py)."""
    import unet
    model = unet.compile_model(new_model(cfg), cfg.loss, cfg.lr, jit, ema=cfg.ema)
    if cfg.init and not state["epoch"]:  # weights only: fine-tuning starts a fresh optimizer
        from extras import warm_start
        warm_start.load_weights(model, cfg.init)
    if state["epoch"]:
        from extras import resume
        resume.load_weights(model, paths["last"])
        if resume.repair(state, writes, read_state(paths["best"])):
            save_best(model, cfg, writes, state)
    return model


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
        common.check_writable(cfg.out)
    paths = run_paths(cfg.out)
    keras = common.import_keras()  # after the flag checks, so bad input fails fast
    from extras import report, runtime as rt
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
            model = build_model(cfg, runtime.jit, state, paths, writes)
        if state["epoch"] and chief:
            print(f"resuming {cfg.out} after epoch {state['epoch']}", flush=True)
        run_record = {**dataclasses.asdict(cfg), "data_summary": data_summary, **runtime.record(),
                      "params": model.count_params(), "model": model.name,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "result": None}
        write_text(writes["run"], json.dumps(run_record, indent=1))

        t_fit = time.time()
        if not (state["epoch"] >= cfg.epochs or state["stopped"]):
            if chief:
                print(report.start_line(cfg, runtime, model, data_summary), flush=True)
            run = Run(cfg, state, writes, model, chief, per_source, started=t_fit)
            callbacks = [epoch_end(run, len(train_batches))]
            if cfg.ema and not per_source:  # fit validates the average (per source: sources.py)
                callbacks.insert(0, keras.callbacks.SwapEMAWeights())
            if cfg.tensorboard and chief:
                from extras import curves
                callbacks.append(curves.tensorboard(cfg.tensorboard))
            verbose = cfg.verbose if cfg.verbose is not None else int(sys.stdout.isatty())
            workers = cfg.workers or os.cpu_count() or 1
            train_feed = rt.feed(train_batches, workers, rt.device_batches(runtime, train_batches))
            with scope():
                model.fit(train_feed,
                          validation_data=None if per_source else rt.feed(val_batches, workers),
                          epochs=cfg.epochs, initial_epoch=state["epoch"],
                          verbose=verbose if chief else 0, callbacks=callbacks)
    finally:
        rt.reset(runtime)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    run_record["result"] = report.summarize(state, paths, t_fit)
    run_record["budget"] = state.get("budget")  # --minutes' decision, or None
    if chief and os.path.exists(paths["best"]):  # stored with the model: predict.py flags by it
        from extras import review
        run_record["review_threshold"] = review.review_threshold_of(paths["best"],
                                                                    val_batches.images)
    run_record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if chief:
        write_text(paths["run"], json.dumps(run_record, indent=1))
    return {**run_record["result"], "chief": chief}


@functools.partial(common.command, interrupted="interrupted: rerun the same command to resume "
                                               "after the last finished epoch")
def main(argv=None):
    from extras import report  # how the run ended, and the exit code
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.plot:
        from extras import curves
        return curves.plot_command(args)
    place = cluster_place()
    if place:  # one of several processes: it supervises a child that trains (extras/cluster.py)
        from extras import cluster
        return cluster.main(lambda: report.finish(train(args)), __file__, argv, place,
                            args.cluster_timeout)
    return report.finish(train(args))


if __name__ == "__main__":
    sys.exit(main())
