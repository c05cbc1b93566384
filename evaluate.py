"""Score a lesion-segmentation model exactly as the ISIC 2018 Task 1 challenge does.

    python evaluate.py --weights best.keras [--data DIR] [--split val|test|all] [--out eval/]
                       [--save-masks DIR] [--threshold 0.5] [--tta]

Per image: squash-resize the image to the model's input size, predict a probability map, resize
that map back to the ground-truth mask's native resolution (bilinear), threshold it, and score it
against the native mask with the challenge's per-image metrics. The summary is the mean over images
(the challenge's "macro average"), plus pooled (all pixels together) Dice/IoU, medians and the worst
images. Any model file works through predict.py's one code path: .keras, a SavedModel folder, or a
.tflite. --save-masks writes the scored images' masks in the ISIC submission format. Photos
without a ground-truth mask are predict.py's.

Each image's row also carries predict.py's uncertainty and review flag, and the summary says how
well they find the failures (Jaccard below 0.65; extras/review.py), with a risk-coverage picture
(extras/risk_coverage.py). Read top to bottom: the metrics, the scored run, the command line. The
comparison grids (grid_*.png) are extras/grids.py.
"""

import csv
import functools
import io
import json
import os
import sys
import time
from typing import NamedTuple

import numpy as np

import common
import data
import predict  # the one prediction path: loaders, TTA, post-processing (imports no Keras)

METRICS = ("dice", "jaccard", "threshold_jaccard", "sensitivity", "specificity", "accuracy")
JACCARD_CUTOFF = 0.65  # the challenge's "thresholded Jaccard": below this an image scores 0


# --- metrics: pure NumPy, vectorized, from confusion counts ---------------------------------------
def confusion(truth, pred):
    """(tp, fp, fn, tn) pixel counts of two boolean masks, (H, W) -> ints or (N, H, W) -> arrays.

    Any encoding works (bool, 0/1, 0/255): nonzero is foreground. Binarize the files first with
    data.load_mask (or > 128, the challenge's rule) before they get here."""
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} != prediction shape {pred.shape}")
    if truth.ndim not in (2, 3):
        raise ValueError(f"masks must be (H, W) or (N, H, W), got shape {truth.shape}")
    truth = truth if truth.dtype == bool else truth != 0
    pred = pred if pred.dtype == bool else pred != 0
    if truth.ndim == 2:
        # Three counts over one AND: the cheapest pass over a 12-megapixel mask.
        tp = np.count_nonzero(truth & pred)
        positives, predicted = np.count_nonzero(truth), np.count_nonzero(pred)
        total = truth.size
    else:
        flat_t, flat_p = truth.reshape(len(truth), -1), pred.reshape(len(pred), -1)
        tp = np.count_nonzero(flat_t & flat_p, axis=1)
        positives, predicted = np.count_nonzero(flat_t, axis=1), np.count_nonzero(flat_p, axis=1)
        total = flat_t.shape[1]
    fp = predicted - tp
    fn = positives - tp
    tn = total - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(numerator, denominator):
    # The challenge scores an undefined ratio (zero denominator, e.g. both masks empty) as 1.0.
    numerator = np.asarray(numerator, np.float64)
    denominator = np.asarray(denominator, np.float64)
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, 1.0, numerator / safe)


def scores_from_confusion(tp, fp, fn, tn):
    """The six challenge metrics from counts; scalars in -> floats out, arrays in -> arrays out."""
    jaccard = _ratio(tp, tp + fp + fn)
    out = {
        "dice": _ratio(2 * np.asarray(tp), 2 * np.asarray(tp) + fp + fn),
        "jaccard": jaccard,
        "threshold_jaccard": np.where(jaccard >= JACCARD_CUTOFF, jaccard, 0.0),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(np.asarray(tp) + tn, np.asarray(tp) + tn + fp + fn),
    }
    if np.ndim(tp) == 0:
        return {k: float(v) for k, v in out.items()}
    return out


def image_scores(truth, pred):
    """Per-image challenge metrics of boolean masks: (H, W) -> dict of floats, (N, H, W) ->
    dict of arrays."""
    return scores_from_confusion(*confusion(truth, pred))


def summarize(rows, worst=5):
    """Aggregate per-image rows (dicts with METRICS and tp/fp/fn/tn) into the summary.

    The headline numbers are per-image means, the challenge's macro average. Pooled Dice/IoU sum
    the counts of all images first, so large images weigh more; medians show the typical image."""
    if not rows:
        raise common.Error("evaluate", "no image could be scored")
    summary = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
    summary["median"] = {k: float(np.median([r[k] for r in rows])) for k in METRICS}
    tp, fp, fn, tn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn", "tn"))
    pooled = scores_from_confusion(tp, fp, fn, tn)
    summary["pooled"] = {"dice": pooled["dice"], "jaccard": pooled["jaccard"]}
    summary["images"] = len(rows)
    ranked = sorted(rows, key=lambda r: (r["dice"], r["image_id"]))
    summary["worst"] = [{"image_id": r["image_id"], "dice": r["dice"]} for r in ranked[:worst]]
    return summary


# --- writing: through common.atomic_write, so a crash never leaves half a file --------------------
def write_bytes(path, payload):
    """`payload` into `path`, whole or not at all."""
    common.atomic_write(path, lambda f: f.write(payload))


def write_csv(path, rows):
    columns = ["image_id", *METRICS, "tp", "fp", "fn", "tn", "height", "width", "uncertainty",
               "review"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    write_bytes(path, buffer.getvalue().encode())


# --- the evaluation loop --------------------------------------------------------------------------
def _draft_ok(image_hw, mask_hw):
    # The image decodes with JPEG draft mode at 1/1, 1/2, 1/4 or 1/8 scale (sizes rounded up);
    # the mask is read in full. Any of those scales mapping the mask onto the image is a match.
    (h, w), (mh, mw) = image_hw, mask_hw
    return any(-(-mh // s) == h and -(-mw // s) == w for s in (1, 2, 4, 8))


class Decoded(NamedTuple):
    """One image read for the model. The pipeline feeds the last field to the model."""
    pair: "data.Pair"
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
        image = data.load_image(pair.image, min_size=(size, size))
    except common.Error as e:
        return {"file": e.file, "problem": e.problem}, time.perf_counter() - t
    decoded = Decoded(pair, image.shape[:2], data.resize_image(image, (size, size)))
    return decoded, time.perf_counter() - t


def _score(decoded, prob, threshold, save_masks, thumbnails=None, review_at=1.0):
    """Resize one probability map to its mask's native size, threshold and score it there: a
    Scored. Pure per image, so a pool of threads can run it (Pillow and NumPy release the GIL)."""
    from extras import review  # each image's uncertainty and review flag

    pair = decoded.pair
    t = time.perf_counter()
    try:
        truth = data.load_mask(pair.mask)  # native resolution: the challenge scores there
    except common.Error as e:
        return Scored({"file": e.file, "problem": e.problem}, None, time.perf_counter() - t, 0.0)
    if not _draft_ok(decoded.hw, truth.shape):
        problem = (f"mask is {truth.shape[1]}x{truth.shape[0]}, its image {pair.image} is not; "
                   "pair skipped")
        return Scored({"file": pair.mask, "problem": problem}, None, time.perf_counter() - t, 0.0)
    pred = data.resize_prob(prob, truth.shape) > threshold
    counts = confusion(truth, pred)
    row = {"image_id": pair.id, **scores_from_confusion(*counts),
           **dict(zip(("tp", "fp", "fn", "tn"), map(int, counts))),
           "height": truth.shape[0], "width": truth.shape[1],
           **review.flag(prob, threshold, review_at)}
    scored = time.perf_counter()
    thumbs = thumbnails(truth, pred) if thumbnails else None
    if save_masks:
        predict.save_mask_png(save_masks, pair.id, pred)
    return Scored(row, thumbs, scored - t, time.perf_counter() - scored)


def evaluate(predictor, pairs, threshold=0.5, tta=False, out=None, save_masks=None,
             progress=True, problems=None, info=None, workers=None, post="none"):
    """Score `pairs` (data.Pair list) with `predictor`; returns the summary dict.

    Writes metrics.csv, summary.json, grid_*.png and risk_coverage.png into `out` (if given) and
    the predicted masks into `save_masks` (if given). Unreadable pairs are reported and skipped,
    listed in summary["problems"] after the given `problems` (from data.find_pairs). A row is
    flagged for review over the predictor's review_threshold."""
    size = predictor.size
    review_at = predictor.review_threshold if predictor.review_threshold is not None else 1.0
    problems = list(problems or [])
    timing = dict.fromkeys(("decode", "predict", "score", "write"), 0.0)
    rows, picker, thumbnails = [], None, None
    for folder in (out, save_masks):
        if folder:
            os.makedirs(folder, exist_ok=True)
    if out:
        from extras import grids  # the comparison grids, written into `out` with the tables
        picker, thumbnails = grids.GridPicker(), grids.thumbnails
    bar = common.Progress(len(pairs), "evaluate", progress)
    started = time.perf_counter()
    decode = lambda pair: _decode(pair, size)
    model = lambda images: predict.predict_probs(predictor, images, tta, post, threshold)
    finish = lambda decoded, prob: _score(decoded, prob, threshold, save_masks, thumbnails,
                                          review_at)
    # In image order, so rows, problems and the grid sample are the same on every run.
    from extras import pipeline  # decode, predict and score side by side
    for decoded, scored in pipeline.overlap(pairs, decode, finish, model, predictor.batch,
                                            timing, problems, bar, workers):
        timing["score"] += scored.score_s
        timing["write"] += scored.write_s
        if "problem" in scored.row:
            problems.append(scored.row)
        else:
            rows.append(scored.row)
            if picker:
                tiles = functools.partial(grids.make_tiles, decoded.image, *scored.thumbs)
                picker.offer(scored.row, tiles)  # makes the tiles only if it keeps the row
        bar.update()

    from extras import review  # how well the review flag finds the failures

    summary = summarize(rows)
    figures = review.review_figures(rows, review_at, JACCARD_CUTOFF)
    summary["review"] = {**figures, "source": predictor.review_source}
    summary.update(info or {})
    summary.update({"model": predictor.path, "model_format": predictor.kind, "size": size,
                    "threshold": threshold, "tta": tta, "post": post, "problems": problems})
    t = time.perf_counter()
    if out:
        write_csv(os.path.join(out, "metrics.csv"), rows)
        picker.write(out)
        from extras import risk_coverage  # the picture beside the grids
        risk_coverage.write(os.path.join(out, "risk_coverage.png"), rows, review_at)
    timing["write"] += time.perf_counter() - t
    timing["total"] = time.perf_counter() - started
    summary["seconds"] = {k: round(v, 3) for k, v in timing.items()}
    if out:
        text = json.dumps(summary, indent=2) + "\n"
        write_bytes(os.path.join(out, "summary.json"), text.encode())
    summary["rows"] = rows
    return summary


# --- command line ---------------------------------------------------------------------------------
def _training_data(run):
    """The folders a model was trained on, from run.json (one path, or a list for train.py with
    several --data); the built-in synthetic set otherwise."""
    folders = data.folders_of(run.get("data"))
    for folder in folders:
        if not os.path.isdir(folder):
            raise common.Error(run["_path"], f"the model was trained on {folder}, which "
                               "is gone; pass --data DIR")
    if folders:
        return folders
    from extras import synthetic  # the default set, as train.py without --data
    return [synthetic.synthetic_dir(cache=run.get("cache") or None)]


NO_MASK_NOTE = "no mask to score against (predict.py segments photos without one)"


def find_inputs(root, val_fraction=0.1, test_fraction=0.1):
    """(pairs, problems, layout) of a data folder; its images without a mask are problems (skipped,
    said), and a folder or file with no masks at all is one error line pointing at predict.py."""
    if not os.path.isdir(root) or data.layout_of(root) is None:
        what = "no such folder" if not os.path.exists(root) else "no masks to score against"
        raise common.Error(root, f"{what} (an ISIC 2016/2017/2018, HAM10000 or images/ + masks/ "
                           "folder); for photos without masks: python predict.py --weights W "
                           "--data PHOTOS --out DIR")
    pairs, problems, layout = data.find_pairs(root, val_fraction, test_fraction)
    return pairs, [{**p, "problem": NO_MASK_NOTE} if p.get("kind") == "no_mask" else p
                   for p in problems], layout


def print_table(summary, file=None):
    file = file or sys.stdout
    print(f"\n{'metric':<18}{'mean':>9}{'median':>9}", file=file)
    for k in METRICS:
        print(f"{k:<18}{summary[k]:>9.4f}{summary['median'][k]:>9.4f}", file=file)
    print(f"{'pooled dice':<18}{summary['pooled']['dice']:>9.4f}", file=file)
    print(f"{'pooled jaccard':<18}{summary['pooled']['jaccard']:>9.4f}", file=file)
    worst = ", ".join(f"{w['image_id']} {w['dice']:.3f}" for w in summary["worst"][:3])
    print(f"images {summary['images']}   worst: {worst}", file=file)
    from extras import review

    print(review.review_line(summary["review"], JACCARD_CUTOFF), file=file)
    s = summary["seconds"]
    print(f"time {s['total']:.2f}s wall; stages (decode and scoring overlap prediction): decode "
          f"{s['decode']:.2f}, predict {s['predict']:.2f}, resize-back+score {s['score']:.2f}, "
          f"write {s['write']:.2f}", file=file)


def print_problems(problems):
    for problem in problems:
        print(f"skipped: {problem['file']}: {problem['problem']}", file=sys.stderr)


def score_folder(predictor, root, args, run, fractions, out, progress, **info):
    """evaluate() of one data folder's chosen split into `out`, with its header, its skipped files
    and its table printed."""
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
    summary = evaluate(predictor, chosen, args.threshold, args.tta, out, args.save_masks,
                       progress=progress, problems=problems, info=info, post=args.post)
    print_problems(summary["problems"][len(problems):])
    return summary


def masks_note(args, summaries):
    """The end of the last line: how many masks --save-masks wrote, and where."""
    if not args.save_masks:
        return ""
    return f"; {sum(s['images'] for s in summaries)} masks in {args.save_masks}"


@common.command
def main(argv=None):
    p = predict.model_parser(__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data folder with masks (default: the training "
                   "data named in run.json beside the weights, else the built-in synthetic set)")
    p.add_argument("--split", default="val", choices=("val", "test", "all"))
    p.add_argument("--out", default="eval", help="folder for metrics.csv, summary.json, grids")
    p.add_argument("--save-masks", default=None, metavar="DIR",
                   help="also write the scored images' <id>_segmentation.png masks "
                   "(ISIC submission format)")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--test-fraction", type=float, default=None)
    args = predict.parse(p, argv)
    if args.weights and not os.path.exists(args.weights):
        raise common.Error(args.weights, "model file not found")
    run = predict.read_run_json(args.weights or predict.RELEASED)
    # Same split fractions as training, so the val split never contains training images.
    val = args.val_fraction
    test = args.test_fraction
    fractions = (val if val is not None else run.get("val_fraction", 0.1),
                 test if test is not None else run.get("test_fraction", 0.1))
    roots = [args.data] if args.data else _training_data(run)
    predictor = predict.load_predictor(args.weights, args.size, args.review_threshold)
    progress = not args.no_progress and sys.stderr.isatty()
    if len(roots) > 1:  # a model trained on several --data folders: each, then all together
        from extras import eval_sources
        return eval_sources.score_sources(sys.modules[__name__], predictor, roots, args, run,
                                          fractions, progress)
    summary = score_folder(predictor, roots[0], args, run, fractions, args.out, progress)
    print_table(summary)
    print(f"wrote {args.out}/: metrics.csv, summary.json, grid_best/worst/random.png, "
          "risk_coverage.png"
          f"{masks_note(args, [summary])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
