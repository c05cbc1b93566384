"""Train the U-Net on ISIC-style skin-lesion data (the built-in synthetic set without --data).

    python train.py --data data/isic2018 --size 128 --epochs 20
    python evaluate.py --weights best.keras

Writes in --out: best.keras, last.keras (model, optimizer and resume state), log.csv, curves.png,
run.json and state.json (README). Kill it at any moment and rerun the same command: it resumes
after the last finished epoch. Read top to bottom: the settings (Config), the machine the run
lands on, the files and the resume state, what an epoch means, what a run says, the callbacks
around each epoch, then train(). Options live in extras/, each named at one line below (an `if`
on its flag); docs/training.md says what each does.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass, fields

import numpy as np

import common
import curves
import data
import layouts
import metrics

STATE_ENTRY = "skin_unet_state.json"  # extra entry inside last.keras; Keras ignores unknown entries
MIN_LR_FACTOR = 0.01  # cosine decays to 1% of --lr; plateau never goes below it either
PLATEAU_PATIENCE, PLATEAU_FACTOR = 3, 0.5
PRECISIONS = ("float32", "mixed_bfloat16")  # what auto probes on a CPU, the default first
PROBE_MIN_STEPS = 500  # a shorter run would spend too much of itself on the probe
PROBE_STEPS, PROBE_ROUNDS, PROBE_MARGIN = 3, 2, 1.05
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
    precision: str = setting("auto", "auto: mixed_bfloat16 on a GPU/TPU, and on a CPU with "
                             "bfloat16 arithmetic where a probe finds it faster", run=True,
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
    """A validated Config from an argv list or parser()'s Namespace; common.Error: exit 2. Every
    check runs before Keras is imported, so a typo fails in a moment."""
    if isinstance(args, (list, tuple)):
        args = parser().parse_args(list(args))
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
        if not os.path.isfile(cfg.init):
            raise common.Error(f"--init {cfg.init}", "file not found")
        cfg.init = os.path.abspath(cfg.init)
    cfg.out = os.path.abspath(cfg.out or ".")
    if cfg.tensorboard:  # never a failure mid-run for a missing package
        from extras import tensorboard
        cfg.tensorboard = tensorboard.checked(cfg.tensorboard)
    return cfg


def data_value(value):
    """--data as stored: None (synthetic) or a list of absolute paths."""
    folders = []
    for folder in layouts.folders_of(value):
        if not os.path.isdir(folder):
            raise common.Error(folder, "data folder not found")
        folder = os.path.abspath(folder)
        if folder in folders:  # the same images twice would weigh one set double, silently
            raise common.Error(f"--data {folder}", "given twice")
        folders.append(folder)
    return folders or None


# --- the machine: backend, accelerator, precision, XLA, distribution, where augmentation runs -----
@dataclass(frozen=True)
class Runtime:
    """The machine a run lands on, resolved once (setup, then settle); run.json records it."""
    backend: str  # "jax", "tensorflow" or "torch"
    accelerator: str  # "gpu", "tpu" or "cpu"
    cpu: dict  # cpu_info()
    precision: str  # the Keras dtype policy; None until settle where only a probe can tell
    precision_reason: str
    jit: bool  # XLA; None until settle where only a probe can tell
    jit_reason: str
    distribute: str  # "none", "mirrored" or "data_parallel"
    replicas: int  # devices the global batch is split over
    processes: int  # processes (hosts) of the run; 1 on one host
    process: int  # this one's index
    augment_on: str  # "host", "device", or None without augmentation
    probe: dict = None  # the probe's images/s per setting; None where it did not run


def accelerator():
    """'gpu' / 'tpu' when the active backend sees one, else 'cpu' (never imports another
    backend)."""
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
    avx512_bf16, amx_tile), "cores"}. Whether XLA helps a CPU step depends on it."""
    try:
        with open("/proc/cpuinfo") as f:  # one block per core, all alike: the last one is kept
            info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in f)}
    except OSError:  # not Linux
        info = {}
    flags = set(info.get("flags", "").split())
    return {"model": info.get("model name") or platform.processor() or platform.machine(),
            "flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
            "cores": os.cpu_count()}


def precision_rule(cfg, accel, cpu_flags):
    """(Keras dtype policy, why); (None, why) where only a timed probe can tell."""
    if cfg.precision != "auto":
        return cfg.precision, f"--precision {cfg.precision}"
    if accel != "cpu":
        return "mixed_bfloat16", "an accelerator computes bfloat16 natively"
    if {"avx512_bf16", "amx_tile"} & set(cpu_flags):
        return None, "this CPU has bfloat16 arithmetic (avx512_bf16 or AMX)"
    return "float32", "this CPU has no bfloat16 arithmetic (avx512_bf16 or AMX)"


def jit_rule(cfg, accel, mode):
    """(XLA on?, why) for this backend and machine; (None, why) where only a timed probe can
    tell."""
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


def distribution_mode(cfg, backend, accel, place):
    """--distribute auto: data_parallel for JAX with several devices (or processes), mirrored for
    TensorFlow with several GPUs, else none."""
    if cfg.distribute != "auto":
        return cfg.distribute
    if backend == "jax":
        import keras
        devices = [d for d in keras.distribution.list_devices() if not d.lower().startswith("cpu")]
        return "data_parallel" if len(devices) > 1 or place else "none"
    if backend == "tensorflow" and accel == "gpu":
        import tensorflow as tf  # TF backend only
        return "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "none"
    return "none"


def setup(cfg, place=None):
    """Resolve precision and XLA by their rules and set up distribution for this machine: (strategy
    scope, Runtime). The scope is MirroredStrategy's, else a null context. Runtime.precision / .jit
    are None where settle must probe; settle sets the dtype policy.
    place: this process's place in a run over several (extras/cluster.py), whose devices all take
    part."""
    import keras
    accel, backend, cpu = accelerator(), keras.backend.backend(), cpu_info()
    precision, precision_why = precision_rule(cfg, accel, cpu["flags"])  # the policy: settle's
    mode = distribution_mode(cfg, backend, accel, place)
    scope, replicas = contextlib.nullcontext, 1
    if mode != "none":  # several devices or processes: extras/distribute.py
        from extras import distribute
        scope, replicas = distribute.setup(mode, backend, cfg.batch)
    # Pillow threads feed a CPU-bound step easily but cap a GPU (docs/training.md): there keras.ops.
    augment_on = cfg.augment_on
    if augment_on == "auto":
        augment_on = "host" if accel == "cpu" else "device"
    jit, why = jit_rule(cfg, accel, mode)
    return scope, Runtime(
        backend=backend, accelerator=accel, cpu=cpu, precision=precision,
        precision_reason=precision_why, jit=jit, jit_reason=why, distribute=mode, replicas=replicas,
        processes=place.processes if place else 1, process=place.index if place else 0,
        augment_on=augment_on if cfg.augment else None)


def reset(runtime):
    """Undo setup's global settings (a second run in the same process starts clean)."""
    import keras
    if runtime.distribute == "data_parallel":
        keras.distribution.set_distribution(None)
    keras.mixed_precision.set_global_policy("float32")


def settle(runtime, cfg, planned_steps, x, y, state):
    """Where the rules leave bfloat16 or XLA to a probe, time each (precision, XLA) setting on this
    machine for a run long enough to pay for it; else the first: float32 without XLA, Keras's CPU
    default. A resumed run keeps the precision it began with. A throwaway model per setting, one
    warm-up step (which compiles), then PROBE_STEPS steps on the training batch (x, y) in
    PROBE_ROUNDS interleaved rounds, best of each; another setting wins only by PROBE_MARGIN.
    Returns the new Runtime, the probe's images/s in it."""
    import keras
    if runtime.precision is None and state["epoch"]:
        runtime = dataclasses.replace(runtime, precision=state["config"]["precision"],
                                      precision_reason="as the run in --out began")
    options = [(p, j) for p in ([runtime.precision] if runtime.precision else PRECISIONS)
               for j in ([runtime.jit] if runtime.jit is not None else (False, True))]
    rates, choice = None, options[0]
    why = f"Keras's CPU default (a run of {planned_steps} steps is too short to probe)"
    if len(options) > 1 and planned_steps >= PROBE_MIN_STEPS:
        models = {}
        for precision, jit in options:
            keras.mixed_precision.set_global_policy(precision)
            models[precision, jit] = compiled_model(cfg, jit)
            models[precision, jit].train_on_batch(x, y)
        rates = dict.fromkeys(options, 0.0)
        for _ in range(PROBE_ROUNDS):
            for option, model in models.items():
                t = time.perf_counter()
                for _ in range(PROBE_STEPS):
                    model.train_on_batch(x, y)  # synchronous: returns host numbers
                rates[option] = max(rates[option], PROBE_STEPS * len(x) / (time.perf_counter() - t))
        keras.utils.set_random_seed(cfg.seed)  # the real model starts as it would without it
        best = max(rates, key=rates.get)
        choice = best if rates[best] > PROBE_MARGIN * rates[options[0]] else options[0]
        rates = {f"{p}{'+xla' if j else ''}": round(r, 2) for (p, j), r in rates.items()}
        why = "probe on this CPU: " + ", ".join(f"{k} {r:.1f}" for k, r in rates.items()) + " img/s"
    precision, jit = choice
    keras.mixed_precision.set_global_policy(precision)
    return dataclasses.replace(
        runtime, precision=precision, jit=jit, probe=rates,
        precision_reason=runtime.precision_reason if runtime.precision else why,
        jit_reason=runtime.jit_reason if runtime.jit is not None else why)


# --- the model ------------------------------------------------------------------------------------
def compiled_model(cfg, jit):
    """The network --encoder / --upsample / --pool ask for, compiled with --loss, --lr and --ema."""
    import unet
    if cfg.encoder != "none":  # a keras.applications backbone as the encoder
        from extras import encoders
        weights = None if cfg.encoder_weights == "none" else cfg.encoder_weights
        model = encoders.build_encoder_unet(cfg.size, cfg.filters, cfg.encoder, weights,
                                            cfg.upsample)
    else:
        model = unet.build_unet(cfg.size, cfg.filters, cfg.depth, cfg.upsample, cfg.pool)
    loss = cfg.loss
    if loss == "bce_lovasz":  # the Lovász loss, a Keras loss function
        from extras import lovasz
        loss = lovasz.bce_lovasz
    return unet.compile_model(model, loss, cfg.lr, jit, ema=cfg.ema)


# --- the files, and the resume state inside last.keras --------------------------------------------
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
    if cfg.ema:  # the optimizer's moving average, swapped in while it is saved
        from extras import ema
        with ema.averaged(model):
            save_model(model, paths["best"], state)
    elif os.path.exists(paths["last"]):  # (a cluster's process 1.. repairing before its 1st save)
        with common.atomic_path(paths["best"]) as tmp:
            shutil.copyfile(paths["last"], tmp)


def resume_or_start(cfg, paths, chief=True):
    """The state of the run in --out when it has this configuration (extras/resume.py), else a
    fresh one. --fresh deletes the old run's files (process 0 only; the others ignore them;
    run.json is rewritten before fit)."""
    if cfg.fresh and chief:
        for k in ("last", "state", "log", "best", "curves"):
            if os.path.exists(paths[k]):
                os.remove(paths[k])
    state = None if cfg.fresh else read_state(paths["last"])
    if state is not None:  # an earlier run: resumed only under the configuration that made it
        from extras import resume
        resume.check_same_run(state, cfg.identity(), Config().identity(), paths["last"])
    else:
        state = {"version": 1, "config": cfg.identity(), "epoch": 0, "best": None, "wait": 0,
                 "plateau_wait": 0, "lr": cfg.lr, "history": [], "stopped": None}
    state["diverged"] = None
    return state


def write_logs(paths, state, draw=True):
    """state.json, log.csv and (if `draw`) curves.png from the state; whether curves.png can
    still be drawn (after a failure, no matplotlib or a full disk, it is not tried again)."""
    write_text(paths["state"], json.dumps(state, indent=1))
    curves.write_log(paths["log"], state["history"])
    return draw and curves.redraw(paths["curves"], state["history"])


# --- what an epoch means for the run --------------------------------------------------------------
def epoch_decision(state, row, cfg):
    """What one epoch's log row means for the run, as the state entries it changes (a pure function:
    no Keras, no files). A non-finite loss or val_loss: "diverged", and nothing else changes. A
    better score (val Dice, or minus the loss without validation) becomes "best"; else the plateau
    schedule halves the lr every PLATEAU_PATIENCE epochs, and --patience epochs set "stopped"; so
    does the end of a --minutes budget (state["budget"], extras/budget.py)."""
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
    budget = state.get("budget")
    if budget and new["epoch"] >= budget["epochs"] and not new["stopped"]:
        new["stopped"] = f"the --minutes {budget['minutes']:g} budget: {budget['epochs']} epochs"
    return new


def planned_epochs(cfg, state):
    """The run's length: --epochs, or the epochs --minutes found to fit."""
    return state["budget"]["epochs"] if state.get("budget") else cfg.epochs


def cosine_lr(cfg, epoch, epochs=None):
    lo, epochs = cfg.lr * MIN_LR_FACTOR, epochs or cfg.epochs
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * epoch / max(epochs, 1)))


# --- what a run says: its start, each epoch, its end, and run.json's account ---------------------
def start_line(cfg, r, model, summary):
    hosts = f" on {r.processes} processes, {r.replicas} devices" if r.processes > 1 else ""
    notes = [f"augmenting on the {r.augment_on}" if r.augment_on else "",
             "sources balanced" if cfg.balance else "",
             f"weights averaged, EMA {cfg.ema}" if cfg.ema else "",
             f"starting from {cfg.init}" if cfg.init else ""]
    machine = f"{r.precision} jit={r.jit} ({r.jit_reason})" if r.jit_reason == r.precision_reason \
        else f"{r.precision} ({r.precision_reason}) jit={r.jit} ({r.jit_reason})"
    return (f"training {model.name} ({model.count_params() / 1e6:.2f} M params){hosts} on "
            f"{summary['train']} images, validating on {summary['val']}, {cfg.size} px, batch "
            f"{cfg.batch}; {r.backend} {r.accelerator} {machine} "
            f"distribute={r.distribute}" + "".join(f"; {n}" for n in notes if n))


def epoch_line(row, epochs, improved):
    names = ("loss", "val_loss", "val_dice", "val_iou", *(k for k in row if "val_dice_" in k))
    scores = "  ".join(f"{k} {row[k]:.4f}" for k in names if row[k] is not None)
    return (f"epoch {row['epoch']}/{epochs}: {scores}  lr {row['lr']:.2e}  "
            f"{row['images_per_sec']:.1f} img/s{'  *best' if improved else ''}")


def data_summary(cfg, train_set, val_set, seconds):
    """run.json's "data_summary": the folders, the split sizes, each source, what was skipped."""
    problems = train_set.problems + [p for p in val_set.problems if p not in train_set.problems]
    names = layouts.source_names([s["path"] for s in val_set.sources])
    return {"path": cfg.data or val_set.sources[0]["path"], "synthetic": cfg.data is None,
            "train": len(train_set.pairs), "val": len(val_set.pairs), "problems": problems,
            "load_seconds": round(seconds, 1),
            "sources": [{"name": name, "path": tr["path"], "layout": tr["layout"],
                         "train": tr["stop"] - tr["start"], "val": va["stop"] - va["start"]}
                        for name, tr, va in zip(names, train_set.sources, val_set.sources)]}


def summarize(state, paths, t_fit):
    """run.json's "result"."""
    rates = [r["images_per_sec"] for r in state["history"]]
    best = state["best"] or {}
    return {"epochs_done": state["epoch"], "best_epoch": best.get("epoch"),
            "val_dice": best.get("val_dice"), "val_iou": best.get("val_iou"),
            "images_per_sec": float(np.median(rates[1:] or rates)) if rates else None,
            "train_seconds": round(time.time() - t_fit, 1), "stopped": state["stopped"],
            "diverged": state["diverged"], "files": [paths[k] for k in
                                                     ("best", "last", "log", "curves", "run")]}


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


def review_threshold(path, images, batch):
    """The threshold stored in run.json, with the model: the one that flags metrics.REVIEW_SHARE
    of the val photos, by the uncertainty of best.keras's maps (as predict.py will compute it)."""
    import keras
    probs = keras.models.load_model(path, compile=False).predict(images, batch_size=batch,
                                                                 verbose=0)
    return metrics.choose_review_threshold(metrics.uncertainty(probs[..., 0]))


# --- the callbacks around each epoch --------------------------------------------------------------
# Keras calls them in list order: the clock first (it measures), then the options' callbacks, then
# the epoch's jobs, which read what the others put in the epoch's logs.
CLOCK_KEYS = ("images_per_sec", "train_seconds", "steady_train_seconds")


def clock(steps, batch):
    """A Keras callback that puts the epoch's training speed into its logs: images_per_sec from the
    second step (the first includes compiling and the feed's start-up), the seconds of the training
    batches, and what they would have taken at that speed. Fed from epoch-level hooks and
    on_train_batch_begin only, so it adds no per-step host sync."""
    import keras

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.begin, self.second, self.end, self.calls = time.perf_counter(), None, None, 0

        def on_train_batch_begin(self, index, logs=None):
            self.calls += 1
            if self.calls == 2:
                self.second = time.perf_counter(), index

        def on_test_begin(self, logs=None):
            if self.end is None:  # fit's validation starts: training batches are done (synced)
                self.end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            end = self.end or time.perf_counter()
            if self.second is not None and steps > self.second[1]:
                ips = (steps - self.second[1]) * batch / max(end - self.second[0], 1e-9)
            else:
                ips = steps * batch / max(end - self.begin, 1e-9)
            logs.update(zip(CLOCK_KEYS, (ips, end - self.begin, steps * batch / ips)))

    return Clock()


def epoch_jobs(cfg, state, paths, chief=True):
    """The Keras callback that runs the schedule and, after every epoch, in order: the log row,
    the decision (epoch_decision), the commit point (last.keras, best.keras), the logs and the
    epoch's line. state: the resume state, committed inside last.keras; paths: where this process
    writes (a cluster's processes 1..: a scratch folder); chief: the process that prints and
    writes the run's files (one of one, or process 0)."""
    import keras

    class EpochJobs(keras.callbacks.Callback):
        draw = True  # curves.png can still be drawn (False after a failure to)

        def on_epoch_begin(self, epoch, logs=None):
            self.begin, self.lr = time.perf_counter(), state["lr"]
            if cfg.schedule == "cosine":
                self.lr = cosine_lr(cfg, epoch, planned_epochs(cfg, state))
            self.model.optimizer.learning_rate = self.lr

        def on_epoch_end(self, epoch, logs=None):
            measured = {k: logs.pop(k) for k in CLOCK_KEYS}  # (kept out of Keras's own logs)
            if "budget" in logs:  # --minutes' plan (extras/budget.py), kept in the resume state
                state["budget"] = logs.pop("budget")
            row = {"epoch": epoch + 1, "lr": float(self.lr),
                   "images_per_sec": round(measured["images_per_sec"], 2),
                   "seconds": round(time.perf_counter() - self.begin, 2)}
            for k in ("loss", "dice", "iou", "val_loss", "val_dice", "val_iou"):
                row[k] = float(logs[k]) if k in logs else None
            row.update({k: v for k, v in logs.items() if k.startswith("val_dice_")})
            decided = epoch_decision(state, row, cfg)
            state.update(decided)
            if decided["diverged"] or decided["stopped"]:
                self.model.stop_training = True
            if decided["diverged"]:  # NaN guard: keep the last good checkpoint, commit nothing
                return
            # The commit point: last.keras holds weights, optimizer and state together. A kill
            # before it replays the epoch; after it, the files written next are repaired on resume.
            improved = state["best"]["epoch"] == row["epoch"]
            save_model(self.model, paths["last"], state)
            if improved:
                save_best(self.model, cfg, paths, state)
            if chief:  # saving a model is collective (above); the rest is process 0's alone
                self.draw = write_logs(paths, state, self.draw)
                print(epoch_line(row, cfg.epochs, improved), flush=True)

    return EpochJobs()


# --- train(): resume or start, data, model, fit ---------------------------------------------------
def load_data(cfg, runtime, epoch):
    """(training batches, validation batches, the validation set, run.json's data summary)."""
    t0 = time.time()
    kw = {"size": cfg.size, "cache": cfg.cache, "progress": sys.stderr.isatty(),
          "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction}
    train_set = data.load_split(cfg.data, "train", **kw)
    val_set = data.load_split(cfg.data, "val", **kw)
    # part: over several processes, each one's Batches give it its part of every batch
    batches = {"augment": cfg.augment, "seed": cfg.seed, "epoch": epoch, "drop_remainder": True,
               "steps": cfg.steps_per_epoch, "part": (runtime.process, runtime.processes)}
    if cfg.balance:  # every source drawn as often as the largest
        from extras import sources
        spans = [(s["start"], s["stop"]) for s in train_set.sources]
        train = sources.Balanced(train_set.images, train_set.masks, cfg.batch, spans, **batches)
    else:
        train = data.Batches(train_set.images, train_set.masks, cfg.batch, **batches)
    summary = data_summary(cfg, train_set, val_set, time.time() - t0)
    if runtime.replicas > 1:  # every validation batch must split evenly over the devices
        from extras import distribute
        val_set = distribute.split_evenly(val_set, runtime.replicas)
    val = data.Batches(val_set.images, val_set.masks, cfg.batch, augment=False, shuffle=False,
                       part=batches["part"])
    return train, val, val_set, summary


def build_model(cfg, jit, state, paths, writes, chief):
    """The compiled U-Net; on resume, with last.keras's weights and optimizer, and the files a
    kill may have left one epoch behind written again from its state."""
    model = compiled_model(cfg, jit)
    if cfg.init and not state["epoch"]:  # --init: weights only; a fresh optimizer fine-tunes
        from extras import warm_start
        warm_start.load_weights(model, cfg.init)
    if state["epoch"]:
        from extras import resume
        resume.load_weights(model, paths["last"])
        write_logs(writes, state, draw=False)
        if resume.best_behind(state, read_state(paths["best"])):
            save_best(model, cfg, writes, state)
        if chief:
            print(f"resuming {cfg.out} after epoch {state['epoch']}", flush=True)
    return model


def cluster_place():
    """This process's place in a run over several processes (extras/cluster.py), or None."""
    if any(name in os.environ for name in CLUSTER_VARS):
        from extras import cluster
        return cluster.cluster_of()


def train(args):
    """Train with an argv list or parser()'s Namespace; returns the summary (also in run.json)."""
    cfg = config_of(args)
    place = cluster_place()  # None on one host
    chief = place is None or place.index == 0
    if chief:
        common.check_writable(cfg.out)
    paths = run_paths(cfg.out)
    keras = common.import_keras()  # after the flag checks, so bad input fails fast
    scratch = None
    if place:  # join the others; processes 1.. write into a scratch folder of their own
        from extras import cluster
        scratch = cluster.join(cfg, place, keras.backend.backend())
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    scope, runtime = setup(cfg, place)
    writes = run_paths(scratch) if scratch else paths
    try:
        state = resume_or_start(dataclasses.replace(cfg, precision=runtime.precision), paths, chief)
        train_batches, val_batches, val_set, summary = load_data(cfg, runtime, state["epoch"])
        planned = max(planned_epochs(cfg, state) - state["epoch"], 0) * len(train_batches)
        runtime = settle(runtime, cfg, planned, *train_batches[0], state)
        state["config"]["precision"] = runtime.precision  # a fresh run's: the probe's choice
        with scope():
            model = build_model(cfg, runtime.jit, state, paths, writes, chief)
        run_record = {**dataclasses.asdict(cfg), "data_summary": summary,
                      **dataclasses.asdict(runtime), "params": model.count_params(),
                      "model": model.name, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "result": None}
        write_text(writes["run"], json.dumps(run_record, indent=1))

        t_fit = time.time()
        if not (state["epoch"] >= cfg.epochs or state["stopped"]):
            if chief:
                print(start_line(cfg, runtime, model, summary), flush=True)
            callbacks = [clock(len(train_batches), cfg.batch)]
            several = len(val_set.sources) > 1  # validated per source, by its own callback
            if several:
                from extras import sources
                callbacks.append(sources.validation(val_set, cfg.loss, cfg.batch, cfg.ema))
            elif cfg.ema:  # fit validates the average
                callbacks.append(keras.callbacks.SwapEMAWeights())
            if cfg.minutes:  # the run's length, fitted to the budget after its first epoch
                from extras import budget
                callbacks.append(budget.callback(cfg.minutes, cfg.epochs, t_fit, chief,
                                                 state.get("budget")))
            callbacks.append(epoch_jobs(cfg, state, writes, chief))
            if cfg.tensorboard and chief:  # TensorBoard's scalars, once per epoch
                from extras import tensorboard
                callbacks.append(tensorboard.callback(cfg.tensorboard))
            verbose = cfg.verbose if cfg.verbose is not None else int(sys.stdout.isatty())
            workers = cfg.workers or os.cpu_count() or 1
            get = None
            if runtime.augment_on == "device":  # warped on the accelerator, drawn on the host
                from extras import device_augment
                get = device_augment.device_batches(train_batches)
            with scope():
                model.fit(data.feed(train_batches, workers, get),
                          validation_data=None if several else data.feed(val_batches, workers),
                          epochs=cfg.epochs, initial_epoch=state["epoch"],
                          verbose=verbose if chief else 0, callbacks=callbacks)
    finally:
        reset(runtime)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    run_record["result"] = summarize(state, paths, t_fit)
    run_record["budget"] = state.get("budget")  # --minutes' decision, or None
    if chief and os.path.exists(paths["best"]):  # stored with the model: predict.py flags by it
        run_record["review_threshold"] = review_threshold(paths["best"], val_batches.images,
                                                          cfg.batch)
    run_record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if chief:
        write_text(paths["run"], json.dumps(run_record, indent=1))
    return {**run_record["result"], "chief": chief}


@functools.partial(common.command, interrupted="interrupted: rerun the same command to resume "
                                               "after the last finished epoch")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.plot:  # only draw curves.png again, from log.csv files
        from extras import plot
        return plot.plot_runs(args.plot, args.out)
    place = cluster_place()
    if place:  # one of several processes: it supervises a child that trains (extras/cluster.py)
        from extras import cluster
        return cluster.main(lambda: finish(train(args)), __file__, argv, place,
                            args.cluster_timeout)
    return finish(train(args))


if __name__ == "__main__":
    sys.exit(main())
