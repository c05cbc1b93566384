"""Score a lesion-segmentation model exactly as the ISIC 2018 Task 1 challenge does.

    python evaluate.py --weights best.keras [--data DIR] [--split val|test|all] [--out eval/]
                       [--save-masks DIR] [--threshold 0.5] [--tta]

Per image: squash-resize the image to the model's input size, predict a probability map, resize
that map back to the ground-truth mask's native resolution (bilinear), threshold it, and score it
against the native mask with the challenge's per-image metrics (metrics.py). The summary is the
mean over images (the challenge's "macro average"), plus pooled (all pixels together) Dice/IoU,
medians and the worst images. Any model file works through inference.py's one code path: .keras, a
SavedModel folder, a .tflite or an .onnx. --save-masks writes the scored images' masks in the ISIC
submission format. Photos without a ground-truth mask are predict.py's.

Each image's row also carries its uncertainty and review flag, and the summary says how well they
find the failures (Jaccard below 0.65), with a risk-coverage picture beside the comparison grids.
A model trained on several --data folders is scored on each, then on all together. Read top to
bottom: the summary, the pictures (grids, risk-coverage), the scored run, the command line.
"""
import csv
import functools
import heapq
import io
import json
import os
import random
import sys
import time
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import common
import imaging
import inference
import layouts
import metrics


def summarize(rows, worst=5):
    """Aggregate per-image rows (dicts with METRICS and tp/fp/fn/tn) into the summary.

    The headline numbers are per-image means, the challenge's macro average. Pooled Dice/IoU sum
    the counts of all images first, so large images weigh more; medians show the typical image."""
    if not rows:
        raise common.Error("evaluate", "no image could be scored")
    summary = {k: float(np.mean([r[k] for r in rows])) for k in metrics.METRICS}
    summary["median"] = {k: float(np.median([r[k] for r in rows])) for k in metrics.METRICS}
    tp, fp, fn, tn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn", "tn"))
    pooled = metrics.scores_from_confusion(tp, fp, fn, tn)
    summary["pooled"] = {"dice": pooled["dice"], "jaccard": pooled["jaccard"]}
    summary["images"] = len(rows)
    ranked = sorted(rows, key=lambda r: (r["dice"], r["image_id"]))
    summary["worst"] = [{"image_id": r["image_id"], "dice": r["dice"]} for r in ranked[:worst]]
    return summary


def review_figures(rows, threshold):
    """How well `review` (uncertainty > threshold) finds the failures, the images whose Jaccard is
    below metrics.JACCARD_CUTOFF: what the flag is for, since they score 0 in the challenge's mean.
    `rows`: evaluate()'s, each with jaccard, dice, threshold_jaccard, uncertainty and review."""
    uncertain = np.array([r["uncertainty"] for r in rows])
    flagged = np.array([bool(r["review"]) for r in rows])
    failed = np.array([r["jaccard"] < metrics.JACCARD_CUTOFF for r in rows])
    kept = [r for r, f in zip(rows, flagged) if not f]
    mean_of = lambda key: float(np.mean([r[key] for r in kept])) if kept else None
    return {"threshold": threshold, "auroc": metrics.auroc(uncertain, failed),
            "failures": int(failed.sum()),
            "caught": float(flagged[failed].mean()) if failed.any() else None,
            "flagged": float(flagged.mean()), "kept": len(kept),
            "kept_dice": mean_of("dice"), "kept_threshold_jaccard": mean_of("threshold_jaccard")}


# --- intervals: how far each mean could move on another draw of photos ---------------------------
RESAMPLES, SEED = 10_000, 0  # the percentile bootstrap over images: how many draws, and their seed
FEW = 5  # with fewer failures (or successes), the review flag's AUROC and "caught" are n/a


def bootstrap(n, statistics, resamples=RESAMPLES, seed=SEED, chunk=1000):
    """{name: [lo, hi]}: the 95 % percentile interval of each statistic over `resamples` draws of
    n photos with replacement, every statistic on the same draws (so a paired difference is one
    more statistic). statistic(idx) takes the draws' row indices (k, n) and returns k values, NaN
    where a draw leaves it undefined; those draws are left out (None if no draw is left)."""
    rng = np.random.default_rng(seed)
    values = {name: [] for name in statistics}
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, (min(chunk, resamples - start), n))
        for name, statistic in statistics.items():
            values[name].append(statistic(idx))
    out = {}
    for name, drawn in values.items():
        drawn = np.concatenate(drawn).astype(np.float64)
        drawn = drawn[np.isfinite(drawn)]
        out[name] = [float(np.percentile(drawn, 2.5)), float(np.percentile(drawn, 97.5))] \
            if len(drawn) else None
    return out


def mean_of(values):
    """The statistic "mean over the drawn photos" of one value per photo."""
    values = np.asarray(values, np.float64)
    return lambda idx: values[idx].mean(axis=1)


def intervals(rows):
    """(the means' {metric: [lo, hi]}, the review flag's {"flagged", "caught", "auroc": [lo, hi]})
    by bootstrap(): "caught" and "auroc" are None (n/a) where fewer than FEW failures or successes
    leave nothing to say, and draws without a failure are left out of them."""
    failed = np.array([r["jaccard"] < metrics.JACCARD_CUTOFF for r in rows])
    flagged = np.array([bool(r["review"]) for r in rows])
    unsure = np.array([r["uncertainty"] for r in rows], np.float64)
    statistics = {k: mean_of([r[k] for r in rows]) for k in metrics.METRICS}
    statistics["flagged"] = mean_of(flagged)
    if FEW <= failed.sum() <= len(rows) - FEW:
        def caught(idx):
            fails = failed[idx].sum(axis=1)
            return np.where(fails > 0, (flagged & failed)[idx].sum(axis=1) / np.maximum(fails, 1),
                            np.nan)

        def auroc(idx):
            found = (metrics.auroc(unsure[i], failed[i]) for i in idx)
            return np.array([np.nan if a is None else a for a in found])

        statistics.update(caught=caught, auroc=auroc)
    ci = bootstrap(len(rows), statistics)
    return ci, {k: ci.pop(k, None) for k in ("flagged", "caught", "auroc")}


def compare(rows, theirs):
    """This model's means minus another's, photo by photo on the photos both scored, each with the
    95 % interval of the paired difference: {"images", "difference": {metric: d}, "ci95"}."""
    by_id = {r["image_id"]: r for r in theirs}
    both = [(r, by_id[r["image_id"]]) for r in rows if r["image_id"] in by_id]
    if not both:
        raise common.Error("--compare", "the two models scored no photo in common")
    differences = {k: [a[k] - b[k] for a, b in both] for k in metrics.METRICS}
    return {"images": len(both), "difference": {k: float(np.mean(v))
                                                for k, v in differences.items()},
            "ci95": bootstrap(len(both), {k: mean_of(v) for k, v in differences.items()})}


def write_json(path, summary):
    text = json.dumps(summary, indent=2) + "\n"
    common.atomic_write(path, lambda f: f.write(text.encode()))


def write_csv(path, rows):
    columns = ["image_id", *metrics.METRICS, "tp", "fp", "fn", "tn", "height", "width",
               "uncertainty", "review"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    common.atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))


# --- Comparison grids: image | ground truth | prediction | overlay --------------------------------
GRID_ROWS = 6          # images per comparison grid (best / worst / random)
TILE = 256             # px per grid tile: large enough to see a lesion border
TP_COLOR, FP_COLOR, FN_COLOR = (0, 200, 0), (255, 0, 255), (0, 160, 255)  # green, magenta, azure


def _fit(array, mode, box=TILE):
    """Letterbox an array into a box x box tile, keeping the native aspect ratio."""
    image = Image.fromarray(array)
    h, w = image.height, image.width
    scale = box / max(h, w)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    # A grey letterbox: the black background of a mask stays visible against it.
    tile = Image.new(mode, (box, box), (96, 96, 96))
    tile.paste(image.convert(mode), ((box - image.width) // 2, (box - image.height) // 2))
    return tile


def thumbnails(truth, pred):
    """Truth and prediction shrunk to grid-tile size (native aspect), a few kB per image."""
    h, w = truth.shape
    scale = TILE / max(h, w)
    hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    # Stride down a 12-megapixel mask first (a view, no copy): the area-preserving resize then
    # works on the small mask instead of making a pass over all of it.
    step = max(1, min(h // hw[0], w // hw[1]) // 2)
    shrink = lambda mask: imaging.resize_mask(mask[::step, ::step], hw)
    return shrink(truth), shrink(pred)


def make_tiles(image, truth_small, pred_small):
    """The four tiles of one grid row: image | ground truth | prediction | overlay."""
    image = imaging.resize_image(image, truth_small.shape)  # squashed back to the native aspect
    overlay = (image * 0.55).astype(np.uint8)
    overlay[truth_small & pred_small] = TP_COLOR
    overlay[~truth_small & pred_small] = FP_COLOR
    overlay[truth_small & ~pred_small] = FN_COLOR
    return [_fit(image, "RGB"), _fit(truth_small.astype(np.uint8) * 255, "RGB"),
            _fit(pred_small.astype(np.uint8) * 255, "RGB"), _fit(overlay, "RGB")]


def _font(size=14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def draw_grid(title, entries):
    """entries: [(row dict, tiles)] -> one PNG-ready image with a caption above every row."""
    font, caption, header = _font(14), 22, 30
    width = 4 * TILE
    grid = Image.new("RGB", (width, header + len(entries) * (caption + TILE)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), f"{title}   columns: image | ground truth | prediction | overlay "
              "(green TP, magenta FP, blue FN)", fill=(0, 0, 0), font=font)
    for i, (row, tiles) in enumerate(entries):
        y = header + i * (caption + TILE)
        caption_text = (f"{row['image_id']}   Dice {row['dice']:.3f}   Jaccard "
                        f"{row['jaccard']:.3f}   {row['width']}x{row['height']}")
        draw.text((6, y + 4), caption_text, fill=(0, 0, 0), font=font)
        for j, tile in enumerate(tiles):
            grid.paste(tile, (j * TILE, y + caption))
    return grid


class GridPicker:
    """Keeps tiles only for the images that can still end up in a grid: the best, the worst and
    a seeded reservoir sample, so memory stays flat however large the split."""

    def __init__(self, rows=GRID_ROWS, seed=0):
        self.rows, self.rng, self.seen = rows, random.Random(seed), 0
        self.best, self.worst, self.sample = [], [], []  # heaps of (key, order, row, tiles)

    def offer(self, row, make_tiles):
        """One scored row, in image order. make_tiles() is called only when the row is kept;
        returns whether it was."""
        # Reservoir sampling: the n-th row takes a random one of the sample's slots with chance
        # rows / n, so every row is equally likely to end up in the random grid.
        slot = self.rng.randrange(self.seen + 1) if self.seen >= self.rows else self.seen
        self.seen += 1
        ranked = ((self.best, row["dice"]), (self.worst, -row["dice"]))
        if slot >= self.rows and all(len(h) >= self.rows and k <= h[0][0] for h, k in ranked):
            return False
        tiles = make_tiles()
        for heap, key in ranked:
            item = (key, -self.seen, row, tiles)  # the later of two equal rows ranks lower
            if len(heap) < self.rows:
                heapq.heappush(heap, item)
            elif key > heap[0][0]:
                heapq.heapreplace(heap, item)
        if slot < len(self.sample):
            self.sample[slot] = (row, tiles)
        elif slot < self.rows:
            self.sample.append((row, tiles))
        return True

    def grids(self):
        best = [(r, t) for _, _, r, t in sorted(self.best, key=lambda e: (-e[0], -e[1]))]
        worst = [(r, t) for _, _, r, t in sorted(self.worst, key=lambda e: (-e[0], -e[1]))]
        sample = sorted(self.sample, key=lambda e: e[0]["image_id"])
        return {"grid_best.png": ("Best images", best), "grid_worst.png": ("Worst images", worst),
                "grid_random.png": ("Random sample", sample)}

    def write(self, folder):
        """Each grid that has rows, as a PNG in `folder`, whole or not at all."""
        for name, (title, entries) in self.grids().items():
            if entries:
                grid = draw_grid(title, entries)
                common.atomic_write(os.path.join(folder, name),
                                    lambda f: grid.save(f, format="PNG", compress_level=1))


# --- The review flag's risk-coverage curve --------------------------------------------------------
# Send the most uncertain photos to a person first: what is the thresholded Jaccard of the photos
# left to the model, against the share sent?
def risk_curve(rows, key):
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


def write_risk_coverage(path, rows, threshold, key="threshold_jaccard"):
    """risk_coverage.png at `path`, written atomically: the ranking by uncertainty beside the best
    any ranking could do (the photos sorted by their true Jaccard, worst first) and the random one,
    a ring where the rows' review flags (uncertainty over `threshold`) stop."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    share, kept = risk_curve(rows, key)
    ax.plot(share, kept, "-", color="C0", label="by uncertainty, most uncertain first")
    best = kept_means(sorted(r[key] for r in rows))
    ax.plot(*best, ":", color="C2", label="best possible (true Jaccard, worst first)")
    ax.axhline(kept[0], color="grey", linewidth=0.8, label="random order (the mean of all)")
    sent = float(np.mean([r["review"] for r in rows]))
    at = min(int(round(sent * len(rows))), len(rows) - 1)
    ax.plot(share[at], kept[at], "o", color="C3", markerfacecolor="none", markersize=9,
            label=f"review threshold {1.0 if threshold is None else threshold:.3f}: {sent:.0%} "
                  f"sent, {kept[at]:.3f} kept")
    ax.set_xlim(0, min(1.0, max(0.5, 2 * sent)))
    ax.set_xlabel("share of photos sent to review")
    ax.set_ylabel("thresholded Jaccard of the rest" if key == "threshold_jaccard" else key)
    ax.set_title(f"risk-coverage, {len(rows)} images", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    common.atomic_write(path, lambda f: f.write(buffer.getvalue()))


# --- the scored run -------------------------------------------------------------------------------
def _draft_ok(image_hw, mask_hw):
    # The image decodes with JPEG draft mode at 1/1, 1/2, 1/4 or 1/8 scale (sizes rounded up);
    # the mask is read in full. Any of those scales mapping the mask onto the image is a match.
    (h, w), (mh, mw) = image_hw, mask_hw
    return any(-(-mh // s) == h and -(-mw // s) == w for s in (1, 2, 4, 8))


class Decoded(NamedTuple):
    """One image read for the model. inference.overlap feeds the last field to the model."""
    pair: "layouts.Pair"
    hw: tuple        # the decoded image's (height, width): JPEG draft mode may shrink it
    image: object    # uint8 (size, size, 3), squashed to the model's input size


class Scored(NamedTuple):
    """One image scored: its row (or its problem: a row with a "problem"), the truth and prediction
    shrunk for the grids (None without them), and the seconds spent scoring and writing its mask."""
    row: dict
    thumbs: tuple | None
    score_s: float
    write_s: float


def _decode(pair, size):
    """(Decoded or a problem dict, seconds)."""
    t = time.perf_counter()
    try:
        # Draft mode: a 4288x2848 JPEG decodes at 1/8 scale straight to >= size x size.
        image = imaging.read_image(pair.image, min_size=(size, size))[0]
    except common.Error as e:
        return {"file": e.file, "problem": e.problem}, time.perf_counter() - t
    decoded = Decoded(pair, image.shape[:2], imaging.resize_image(image, (size, size)))
    return decoded, time.perf_counter() - t


def _score(decoded, prob, threshold, save_masks, grids=False, review_at=None):
    """Resize one probability map to its mask's native size, threshold and score it there: a
    Scored. Pure per image, so a pool of threads can run it (Pillow and NumPy release the GIL)."""
    pair = decoded.pair
    t = time.perf_counter()
    try:
        truth = imaging.load_mask(pair.mask)  # native resolution: the challenge scores there
    except common.Error as e:
        return Scored({"file": e.file, "problem": e.problem}, None, time.perf_counter() - t, 0.0)
    if not _draft_ok(decoded.hw, truth.shape):
        problem = (f"mask is {truth.shape[1]}x{truth.shape[0]}, its image {pair.image} is not; "
                   "pair skipped")
        return Scored({"file": pair.mask, "problem": problem}, None, time.perf_counter() - t, 0.0)
    pred = imaging.resize_prob(prob, truth.shape) > threshold
    counts = metrics.confusion(truth, pred)
    row = {"image_id": pair.id, **metrics.scores_from_confusion(*counts),
           **dict(zip(("tp", "fp", "fn", "tn"), map(int, counts))),
           "height": truth.shape[0], "width": truth.shape[1],
           **metrics.flag(prob, threshold, review_at)}
    scored = time.perf_counter()
    thumbs = thumbnails(truth, pred) if grids else None
    if save_masks:
        imaging.save_mask_png(save_masks, pair.id, pred)
    return Scored(row, thumbs, scored - t, time.perf_counter() - scored)


def evaluate(predictor, pairs, threshold=0.5, tta=False, out=None, save_masks=None,
             progress=True, problems=None, info=None, workers=None, post="none", against=None):
    """Score `pairs` (layouts.Pair list) with `predictor`; returns the summary dict.

    Writes metrics.csv, summary.json, grid_*.png and risk_coverage.png into `out` (if given) and
    the predicted masks into `save_masks` (if given). Unreadable pairs are reported and skipped,
    listed in summary["problems"] after the given `problems` (from layouts.find_pairs). A row is
    flagged for review over the predictor's review_threshold. against: another model's summary of
    the same pairs (--compare), compared photo by photo into summary["compare"]."""
    size, review_at = predictor.size, predictor.review_threshold
    problems = list(problems or [])
    timing = dict.fromkeys(("decode", "predict", "score", "write"), 0.0)
    rows = []
    for folder in (out, save_masks):
        if folder:
            os.makedirs(folder, exist_ok=True)
    picker = GridPicker() if out else None  # the comparison grids, written with the tables
    bar = common.Progress(len(pairs), "evaluate", progress)
    started = time.perf_counter()
    decode = lambda pair: _decode(pair, size)
    predict = lambda x: inference.predict_probs(predictor, x, tta, post, threshold)
    finish = lambda decoded, prob: _score(decoded, prob, threshold, save_masks, bool(out),
                                          review_at)
    # In image order, so rows, problems and the grid sample are the same on every run.
    for decoded, scored in inference.overlap(pairs, decode, finish, predict, predictor.batch,
                                             timing, problems, bar, workers, predictor.lanes):
        timing["score"] += scored.score_s
        timing["write"] += scored.write_s
        if "problem" in scored.row:
            problems.append(scored.row)
        else:
            rows.append(scored.row)
            if picker:
                tiles = functools.partial(make_tiles, decoded.image, *scored.thumbs)
                picker.offer(scored.row, tiles)  # makes the tiles only if it keeps the row
        bar.update()

    summary = summarize(rows)
    summary["ci95"], review_ci = intervals(rows)
    summary["bootstrap"] = {"resamples": RESAMPLES, "seed": SEED, "over": "images, percentile"}
    summary["review"] = {**review_figures(rows, review_at), "source": predictor.review_source,
                         "ci95": review_ci}
    summary.update(info or {})
    summary.update({"model": predictor.path, "model_format": predictor.kind, "size": size,
                    "threshold": threshold, "tta": tta, "post": post, "problems": problems})
    if against is not None:
        summary["compare"] = {"model": against["model"], **compare(rows, against["rows"])}
    t = time.perf_counter()
    if out:
        write_csv(os.path.join(out, "metrics.csv"), rows)
        picker.write(out)
        write_risk_coverage(os.path.join(out, "risk_coverage.png"), rows, review_at)
    timing["write"] += time.perf_counter() - t
    timing["total"] = time.perf_counter() - started
    summary["seconds"] = {k: round(v, 3) for k, v in timing.items()}
    if out:
        write_json(os.path.join(out, "summary.json"), summary)
    summary["rows"] = rows
    return summary


# --- command line ---------------------------------------------------------------------------------
NO_MASK_NOTE = "no mask to score against (predict.py segments photos without one)"


def find_inputs(root, val_fraction=0.1, test_fraction=0.1):
    """(pairs, problems, layout) of a data folder; its images without a mask are problems (skipped,
    said), and a folder or file with no masks at all is one error line pointing at predict.py."""
    if not os.path.isdir(root) or layouts.layout_of(root) is None:
        what = "no such folder" if not os.path.exists(root) else "no masks to score against"
        raise common.Error(root, f"{what} (an ISIC 2016/2017/2018, HAM10000 or images/ + masks/ "
                           "folder); for photos without masks: python predict.py --weights W "
                           "--data PHOTOS --out DIR")
    pairs, problems, layout = layouts.find_pairs(root, val_fraction, test_fraction)
    return pairs, [{**p, "problem": NO_MASK_NOTE} if p.get("kind") == "no_mask" else p
                   for p in problems], layout


def with_ci(value, ci, form):
    """A figure and its interval as printed: `0.812 (95% CI 0.774-0.851)`, n/a where either is
    missing."""
    if value is None or ci is None:
        return "n/a" if value is None else f"{value:{form}} (95% CI n/a)"
    return f"{value:{form}} (95% CI {ci[0]:{form}}-{ci[1]:{form}})"


def review_line(r):
    """The summary's review figures and their "source" in one line (None prints as n/a: no
    failures, or nothing kept)."""
    show = lambda v, form: "n/a" if v is None else format(v, form)
    ci = r.get("ci95") or {}
    threshold = 1.0 if r["threshold"] is None else r["threshold"]
    return (f"review (uncertainty > {threshold:.3f}, {r['source']}): flags "
            f"{with_ci(r['flagged'], ci.get('flagged'), '.1%')} of images and catches "
            f"{with_ci(r['caught'], ci.get('caught'), '.0%')} of the "
            f"{r['failures']} failures (Jaccard < {metrics.JACCARD_CUTOFF}); "
            f"AUROC {with_ci(r['auroc'], ci.get('auroc'), '.3f')}; "
            f"not flagged: Dice {show(r['kept_dice'], '.4f')}, thresholded Jaccard "
            f"{show(r['kept_threshold_jaccard'], '.4f')}")


def print_table(summary, file=None):
    """The means with their 95 % intervals (a bootstrap over the images), medians, pooled scores,
    the worst images, the review flag, the time."""
    file = file or sys.stdout
    print(f"\n{'metric':<18}{'mean':>9}{'95% CI':>16}{'median':>9}", file=file)
    for k in metrics.METRICS:
        lo, hi = summary["ci95"][k]
        print(f"{k:<18}{summary[k]:>9.4f}{f'{lo:.4f}-{hi:.4f}':>16}{summary['median'][k]:>9.4f}",
              file=file)
    print(f"{'pooled dice':<18}{summary['pooled']['dice']:>9.4f}", file=file)
    print(f"{'pooled jaccard':<18}{summary['pooled']['jaccard']:>9.4f}", file=file)
    worst = ", ".join(f"{w['image_id']} {w['dice']:.3f}" for w in summary["worst"][:3])
    print(f"images {summary['images']}   worst: {worst}", file=file)
    print(f"Dice {with_ci(summary['dice'], summary['ci95']['dice'], '.3f')}, thresholded Jaccard "
          f"{with_ci(summary['threshold_jaccard'], summary['ci95']['threshold_jaccard'], '.3f')} "
          f"(percentile bootstrap over the {summary['images']} images, {RESAMPLES} draws)",
          file=file)
    print(review_line(summary["review"]), file=file)
    s = summary["seconds"]
    print(f"time {s['total']:.2f}s wall; stages (decode and scoring overlap prediction): decode "
          f"{s['decode']:.2f}, predict {s['predict']:.2f}, resize-back+score {s['score']:.2f}, "
          f"write {s['write']:.2f}", file=file)


def print_comparison(c, ours, theirs, file=None):
    """--compare: each mean's paired difference and its interval, and what the interval says."""
    print(f"\n{ours} minus {theirs}, photo by photo on {c['images']} images (95% CI):",
          file=file or sys.stdout)
    for k in metrics.METRICS:
        lo, hi = c["ci95"][k]
        says = "higher" if lo > 0 else "lower" if hi < 0 else "no difference shown"
        print(f"{k:<18}{c['difference'][k]:>+9.4f}  ({lo:+.4f} to {hi:+.4f}): {says}",
              file=file or sys.stdout)


def print_problems(problems):
    for problem in problems:
        print(f"skipped: {problem['file']}: {problem['problem']}", file=sys.stderr)


def score_folder(predictor, root, args, run, fractions, out, progress, other=None, **info):
    """evaluate() of one data folder's chosen split into `out`, with its header and its skipped
    files printed; with `other` (--compare's predictor), also the paired comparison with it."""
    pairs, problems, layout = find_inputs(root, *fractions)
    chosen = [q for q in pairs if args.split == "all" or q.split == args.split]
    if not chosen:
        raise common.Error(root, f"no images in the {args.split} split ({len(pairs)} pairs found, "
                           f"layout {layout})")
    print(f"model {predictor.path} ({predictor.kind}, {predictor.size}px)   data {root} ({layout}, "
          f"split {args.split}: {len(chosen)} images)", file=sys.stderr)
    print_problems(problems)
    info = {**info, "data": os.path.abspath(root), "layout": layout, "split": args.split,
            "val_fraction": fractions[0], "test_fraction": fractions[1],
            "run_json": run.get("_path")}
    theirs = None
    if other is not None:  # --compare: the other model on the same photos, first, then paired
        theirs = evaluate(other, chosen, args.threshold, args.tta, progress=progress,
                          post=args.post)
    summary = evaluate(predictor, chosen, args.threshold, args.tta, out, args.save_masks,
                       progress=progress, problems=problems, info=info, post=args.post,
                       against=theirs)
    print_problems(summary["problems"][len(problems):])
    return summary


def score_sources(predictor, roots, args, run, fractions, progress):
    """A model trained on several --data folders: each into <out>/<name>/ as one folder is, then all
    the images together (aggregated from the per-source rows: one prediction per image) into
    <out>/summary.json, each source's headline inside. Returns the summaries."""
    summaries, names = {}, layouts.source_names(roots)
    for name, root in zip(names, roots):
        summaries[name] = score_folder(predictor, root, args, run, fractions,
                                       os.path.join(args.out, name), progress, source=name)
        print(f"\n{name}: {root}")
        print_table(summaries[name])
    every = summaries.values()
    rows = [row for s in every for row in s["rows"]]
    headline = ("data", "layout", "images", *metrics.METRICS, "ci95", "median", "pooled", "worst")
    stages = ("decode", "predict", "score", "write", "total")
    ci, review_ci = intervals(rows)
    together = {
        **summarize(rows), "ci95": ci, "bootstrap": summaries[names[0]]["bootstrap"],
        "review": {**review_figures(rows, predictor.review_threshold),
                   "source": predictor.review_source, "ci95": review_ci},
        "data": [os.path.abspath(r) for r in roots], "split": args.split,
        "val_fraction": fractions[0], "test_fraction": fractions[1], "run_json": run.get("_path"),
        "model": predictor.path, "model_format": predictor.kind, "size": predictor.size,
        "threshold": args.threshold, "tta": args.tta, "post": args.post,
        "problems": [p for s in every for p in s["problems"]],
        "seconds": {k: round(sum(s["seconds"][k] for s in every), 3) for k in stages},
        "sources": {name: {k: s[k] for k in headline} for name, s in summaries.items()},
    }
    write_json(os.path.join(args.out, "summary.json"), together)
    print(f"\nall {len(roots)} sources together")
    print_table(together)
    return summaries


@common.command
def main(argv=None):
    p = inference.model_parser(__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data folder with masks (default: the training "
                   "data named in run.json beside the weights, else the built-in synthetic set)")
    p.add_argument("--split", default="val", choices=("val", "test", "all"))
    p.add_argument("--out", default="eval", help="folder for metrics.csv, summary.json, grids")
    p.add_argument("--save-masks", default=None, metavar="DIR",
                   help="also write the scored images' <id>_segmentation.png masks "
                   "(ISIC submission format)")
    p.add_argument("--compare", metavar="OTHER", help="also score this model on the same "
                   "photos: the paired difference of every mean, with its 95%% interval")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--test-fraction", type=float, default=None)
    args = inference.parse(p, argv)
    if args.weights and not os.path.exists(args.weights):
        raise common.Error(args.weights, "model file not found")
    run = inference.read_run_json(args.weights or inference.RELEASED)
    # Same split fractions as training, so the val split never contains training images.
    val, test = args.val_fraction, args.test_fraction
    fractions = (val if val is not None else run.get("val_fraction", 0.1),
                 test if test is not None else run.get("test_fraction", 0.1))
    if args.data:
        roots = [args.data]
    else:  # the folders the model was trained on, as run.json names them (none: synthetic)
        for folder in layouts.folders_of(run.get("data")):
            if not os.path.isdir(folder):
                raise common.Error(run["_path"], f"the model was trained on {folder}, which "
                                   "is gone; pass --data DIR")
        roots = layouts.data_folders(run.get("data"), cache=run.get("cache"))
    predictor = inference.load_predictor(args.weights, args.size, args.review_threshold)
    other = None
    if args.compare:
        if len(roots) > 1:
            raise common.Error("--compare", "give one --data folder to compare two models on")
        other = inference.load_predictor(args.compare, args.size, args.review_threshold)
    progress = not args.no_progress and sys.stderr.isatty()
    if len(roots) > 1:
        summaries = list(score_sources(predictor, roots, args, run, fractions, progress).values())
        wrote = (f"summary.json (all together, and per source), and per source "
                 f"({', '.join(layouts.source_names(roots))}) <name>/metrics.csv, summary.json, "
                 "grid_best/worst/random.png")
    else:
        summaries = [score_folder(predictor, roots[0], args, run, fractions, args.out, progress,
                                  other)]
        print_table(summaries[0])
        if other is not None:
            print_comparison(summaries[0]["compare"], predictor.path, other.path)
        wrote = "metrics.csv, summary.json, grid_best/worst/random.png, risk_coverage.png"
    masks = (f"; {sum(s['images'] for s in summaries)} masks in {args.save_masks}"
             if args.save_masks else "")
    print(f"wrote {args.out}/: {wrote}{masks}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
