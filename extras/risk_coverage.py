"""The review flag's risk-coverage picture: risk_coverage.png, which evaluate.py writes beside the
grids (evaluate() imports this module when it has an `out` folder).

Send the most uncertain photos to a person first: what is the thresholded Jaccard of the photos
left to the model, against the share sent? The ranking by uncertainty is drawn beside the best any
ranking could do (the photos sorted by their true Jaccard, worst first) and the random one, a
ring at the review threshold. matplotlib is imported only to draw.
"""
import io

import numpy as np

import common


def curve(rows, key):
    """(share sent to review, mean of `key` over the rest) when photos go to review in order of
    uncertainty, most uncertain first; the last point keeps one photo."""
    order = sorted(rows, key=lambda r: -r["uncertainty"])
    return kept_means([r[key] for r in order])


def kept_means(values):
    """The mean of values[k:] for k = 0 .. n - 1, against the share k / n sent."""
    values = np.asarray(values, np.float64)
    n = len(values)
    tail_sums = np.cumsum(values[::-1])[::-1]
    return np.arange(n) / n, tail_sums / np.arange(n, 0, -1)


def write(path, rows, threshold, key="threshold_jaccard"):
    """risk_coverage.png at `path`, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    share, kept = curve(rows, key)
    ax.plot(share, kept, "-", color="C0", label="by uncertainty, most uncertain first")
    best = kept_means(sorted(r[key] for r in rows))
    ax.plot(*best, ":", color="C2", label="best possible (true Jaccard, worst first)")
    ax.axhline(kept[0], color="grey", linewidth=0.8, label="random order (the mean of all)")
    sent = float(np.mean([r["uncertainty"] > threshold for r in rows]))
    at = min(int(round(sent * len(rows))), len(rows) - 1)
    ax.plot(share[at], kept[at], "o", color="C3", markerfacecolor="none", markersize=9,
            label=f"review threshold {threshold:.3f}: {sent:.0%} sent, {kept[at]:.3f} kept")
    ax.set_xlim(0, min(1.0, max(0.5, 2 * sent)))
    ax.set_xlabel("share of photos sent to review")
    ax.set_ylabel("thresholded Jaccard of the rest" if key == "threshold_jaccard" else key)
    ax.set_title(f"risk-coverage, {len(rows)} images", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    common.atomic_write(path, lambda f: f.write(buffer.getvalue()))
