"""Knowing when the mask is wrong: one number per photo, and the review flag (issue 33).

    python predict.py --data photos/ --out masks/ [--review-threshold U]

The number, uncertainty: 1 - the soft Jaccard of a model-size probability map and its own mask
(prob > threshold), in [0, 1); what the mask would miss by if the probabilities were honest. The
flag: a photo is flagged for review when its uncertainty is over the model's review threshold
(flag). predict.py writes both to predictions.csv, evaluate.py to metrics.csv, app.py shows them.

The threshold (with_review): --review-threshold, else the one stored with the model, else
REVIEW_THRESHOLD. train.py stores in run.json the lowest that flags at most REVIEW_SHARE of its val
photos (review_threshold_of, choose_review_threshold); the released model's is in
models/skin_unet.json, chosen the same way by bench/review.py.

How well the flag finds the failures (images whose Jaccard is below evaluate.JACCARD_CUTOFF, which
the challenge scores 0): auroc, review_figures and review_line, for evaluate.py's summary; its
risk-coverage picture is extras/risk_coverage.py. docs/evaluation.md, "the review flag", has more.
NumPy only; predict.py, evaluate.py, app.py and train.py import it inside the functions using it.
"""
import os

import numpy as np

REVIEW_THRESHOLD = 0.2  # for a model that stores none: docs/evaluation.md, "the review flag"
REVIEW_SHARE = 0.15  # train.py stores the threshold that flags this share of its val photos


# --- the number and the flag -----------------------------------------------------------------
def uncertainty(prob, threshold=0.5):
    """Per map of (H, W) or (N, H, W) probabilities, in [0, 1): 1 - the soft Jaccard of the map
    and its own mask (prob > threshold), what the mask would miss by if the probabilities were
    honest. A confident map (every pixel 0 or 1) scores 0; a pixel of smoothing keeps an almost
    empty map from jumping to 1. Sums only: no flip or rotation of the map changes it."""
    prob = np.asarray(prob, np.float64)
    mask = prob > threshold
    inside = np.sum(prob, axis=(-2, -1), where=mask)
    union = np.count_nonzero(mask, axis=(-2, -1)) + np.sum(prob, axis=(-2, -1), where=~mask)
    return 1.0 - (inside + 1.0) / (union + 1.0)


def flag(prob, threshold, review_at):
    """One model-size map's row fields: its uncertainty, and review = 1 when that is over
    `review_at`, the predictor's review threshold (None or 1.0 flags nothing)."""
    unsure = float(uncertainty(prob, threshold))
    return {"uncertainty": unsure, "review": int(review_at is not None and unsure > review_at)}


# --- the threshold: chosen on val, stored with the model -------------------------------------
def choose_review_threshold(uncertainties, share=REVIEW_SHARE):
    """The lowest threshold (one of the values) that flags at most `share` of these photos; a photo
    is flagged when its uncertainty is over it. None for no photos."""
    values = np.sort(np.asarray(uncertainties, np.float64))
    if not len(values):
        return None
    return float(values[len(values) - int(share * len(values)) - 1])


def review_threshold_of(weights, val_images):
    """The threshold train.py stores in run.json: the one that flags REVIEW_SHARE of the model's
    val photos (uint8 (N, S, S, 3) at its input size); None without any."""
    if not len(val_images):
        return None
    import predict  # the one prediction path

    return choose_review_threshold(uncertainty(predict.load_predictor(weights).predict(val_images)))


def with_review(predictor, run, override=None):
    """The predictor with its review threshold: `override` (--review-threshold), else run.json's,
    else REVIEW_THRESHOLD (a model trained before train.py stored one)."""
    if override is not None:
        predictor.review_threshold, predictor.review_source = float(override), "--review-threshold"
    elif run.get("review_threshold") is not None:
        predictor.review_threshold = float(run["review_threshold"])
        predictor.review_source = f"from {os.path.basename(run['_path'])}"
    else:
        predictor.review_threshold = REVIEW_THRESHOLD
        predictor.review_source = "the default: the model stores none"
    return predictor


# --- how well the flag finds the failures (evaluate.py) --------------------------------------
def auroc(scores, positives):
    """The chance that a random positive scores above a random negative, ties counting half (the
    area under the ROC curve, from ranks: Mann-Whitney U). None without both kinds."""
    scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if not n_pos or not n_neg:
        return None
    values, where, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based; tied values share their mean
    u = mean_rank[where.ravel()][positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def review_figures(rows, threshold, cutoff):
    """How well `review` (uncertainty > threshold) finds the failures, the images whose Jaccard is
    below `cutoff` (evaluate.JACCARD_CUTOFF, passed: evaluate.py may be the running script): what
    the flag is for, since they score 0 in the challenge's mean. `rows`: evaluate.py's."""
    uncertain = np.array([r["uncertainty"] for r in rows])
    flagged = np.array([bool(r["review"]) for r in rows])
    failed = np.array([r["jaccard"] < cutoff for r in rows])
    kept = [r for r, f in zip(rows, flagged) if not f]
    return {"threshold": threshold, "auroc": auroc(uncertain, failed),
            "failures": int(failed.sum()),
            "caught": float(flagged[failed].mean()) if failed.any() else None,
            "flagged": float(flagged.mean()), "kept": len(kept),
            "kept_dice": float(np.mean([r["dice"] for r in kept])) if kept else None,
            "kept_threshold_jaccard": (float(np.mean([r["threshold_jaccard"] for r in kept]))
                                       if kept else None)}


def review_line(r, cutoff):
    """review_figures and its "source" in one line (None prints as n/a: no failures, or nothing
    kept); `cutoff` as for review_figures."""
    show = lambda v, form: "n/a" if v is None else format(v, form)
    return (f"review (uncertainty > {r['threshold']:.3f}, {r['source']}): flags "
            f"{r['flagged']:.1%} of images and catches {show(r['caught'], '.0%')} of the "
            f"{r['failures']} failures (Jaccard < {cutoff}); "
            f"AUROC {show(r['auroc'], '.3f')}; "
            f"not flagged: Dice {show(r['kept_dice'], '.4f')}, thresholded Jaccard "
            f"{show(r['kept_threshold_jaccard'], '.4f')}")
