"""A training run's log: log.csv (written after every epoch, read back by --plot), its pictures
(curves.png, drawn after every epoch, and by `python train.py --plot RUN [RUN ...]` from log.csv
files alone) and --tensorboard's event files.

matplotlib is imported only to draw; TensorFlow's tensorboard package only with --tensorboard.
"""
import csv
import importlib.util
import json
import os
import sys

import common

LOG_FIELDS = ["epoch", "loss", "dice", "iou", "val_loss", "val_dice", "val_iou", "lr",
              "images_per_sec", "seconds"]


def write_log(path, rows):
    """log.csv. Per-source columns (val_dice_<name>) exist only with 2+ sources; rows carry them."""
    names = LOG_FIELDS + [k for k in (rows[0] if rows else {}) if k not in LOG_FIELDS]

    def cell(v):
        return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)

    lines = [",".join(names)] + [",".join(cell(r.get(k)) for k in names) for r in rows]
    text = "\n".join(lines) + "\n"
    common.atomic_write(path, lambda f: f.write(text.encode()))


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
        raise common.Error(path, "not found (a run folder holds log.csv after its first "
                           "epoch)") from None
    except (ValueError, csv.Error) as e:
        raise common.Error(path, f"not a train.py log ({common.one_line(e)})") from None


def draw_curves(path, runs):
    """curves.png: loss (train solid, val dashed), val Dice (solid) and IoU (dotted) with each
    source's val Dice, and the learning rate, per epoch; a ring marks each run's best val Dice.
    runs: [(name, rows)], one line set per run. matplotlib's object API with the Agg canvas: no
    pyplot, no window, no global state. The epochs drawn are in the PNG's Description chunk.
    Written atomically."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 3.6), dpi=100, layout="constrained")
    loss_ax, score_ax, lr_ax = fig.subplots(1, 3)
    drawn = {}
    for i, (name, rows) in enumerate(runs):
        colour, label = f"C{i}", f"{name}: " if len(runs) > 1 else ""
        drawn[name or "run"] = len(rows)

        def line(ax, key, style, text, rows=rows, label=label, colour=colour, **kw):
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), style, label=label + text, **{"color": colour, **kw})
            return points

        line(loss_ax, "loss", "-", "train loss")
        line(loss_ax, "val_loss", "--", "val loss")
        dice = line(score_ax, "val_dice", "-", "val Dice")
        line(score_ax, "val_iou", ":", "val IoU")
        sources = [k for k in (rows[0] if rows else {}) if k.startswith("val_dice_")]
        for j, key in enumerate(sources):
            line(score_ax, key, "-", key[len("val_dice_"):] + " Dice",
                 color=f"C{len(runs) + i * len(sources) + j}", linewidth=0.8, alpha=0.8)
        line(lr_ax, "lr", "-", "lr")
        if dice:
            best = max(dice, key=lambda p: p[1])
            score_ax.plot(*best, "o", color=colour, markerfacecolor="none", markersize=9)
            score_ax.annotate(f"best {best[1]:.3f}, epoch {best[0]}", best,
                              textcoords="offset points", xytext=(-6, -14), ha="right",
                              fontsize=8, color=colour)
    titles = ((loss_ax, "loss"), (score_ax, "validation (per image, > 0.5)"),
              (lr_ax, "learning rate"))
    for ax, title in titles:
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


def redraw(path, rows):
    """curves.png of one run after an epoch: True, or False (said once) where it cannot be drawn
    (no matplotlib, a full disk): a picture is not worth a run."""
    try:
        draw_curves(path, [("", rows)])
        return True
    except (OSError, ImportError) as e:
        print(f"note: {path}: not drawn ({common.one_line(e)})", file=sys.stderr)
        return False


def plot_command(cfg):
    """--plot RUN [RUN ...]: draw from log.csv files alone (no Keras): RUN/curves.png for one run,
    else curves.png in --out (default: here), a line set per run named by its folder."""
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


def check_tensorboard(folder):
    """--tensorboard DIR as an absolute path, checked before anything runs: never a failure
    mid-run for a missing package."""
    missing = [m for m in ("tensorboard", "tensorflow") if importlib.util.find_spec(m) is None]
    if missing:
        raise common.Error("--tensorboard", f"needs {' and '.join(missing)} (pip install "
                           f"{' '.join(missing)}); TensorFlow writes the event files on every "
                           "Keras backend")
    return os.path.abspath(folder)


def tensorboard(folder):
    """keras.callbacks.TensorBoard for --tensorboard: scalars once per epoch (the loss, Dice and
    IoU, their val_ forms and each source's val Dice, the learning rate), no graph, no profiling."""
    import keras
    return keras.callbacks.TensorBoard(folder, histogram_freq=0, write_graph=False,
                                       update_freq="epoch", profile_batch=0)
