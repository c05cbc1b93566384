"""A training run's log and its picture: log.csv (a row per epoch) and curves.png (loss,
validation scores and learning rate per epoch), both written after every epoch. `train.py --plot`
draws the picture again from log.csv files alone (extras/plot.py reads them back).

matplotlib is imported only to draw, inside the function that draws.
"""
import json
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
