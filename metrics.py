"""The scores, in NumPy: the ISIC challenge's per-image metrics, the uncertainty behind the review
flag, the review threshold's choice and the AUROC by which the flag is judged.

One home for every number a model is judged by: evaluate.py scores with it, predict.py and the web
page flag photos with it, train.py picks the review threshold it stores with a model. No Keras
(unet.py has the training-time Dice / IoU, the same rule in keras.ops).
"""
import numpy as np

METRICS = ("dice", "jaccard", "threshold_jaccard", "sensitivity", "specificity", "accuracy")
JACCARD_CUTOFF = 0.65  # the challenge's "thresholded Jaccard": below this an image scores 0
REVIEW_THRESHOLD = 0.2  # for a model that stores none: docs/evaluation.md, "the review flag"
REVIEW_SHARE = 0.15  # train.py stores the threshold that flags this share of its val photos


# --- the challenge's metrics, from confusion counts -----------------------------------------------
def confusion(truth, pred):
    """(tp, fp, fn, tn) pixel counts of two boolean masks, (H, W) -> ints or (N, H, W) -> arrays.

    Any encoding works (bool, 0/1, 0/255): nonzero is foreground. Binarize the files first with
    imaging.load_mask (or > 128, the challenge's rule) before they get here."""
    truth, pred = np.asarray(truth), np.asarray(pred)
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
    return tp, fp, fn, total - tp - fp - fn


def _ratio(numerator, denominator):
    # The challenge scores an undefined ratio (zero denominator, e.g. both masks empty) as 1.0.
    numerator = np.asarray(numerator, np.float64)
    denominator = np.asarray(denominator, np.float64)
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, 1.0, numerator / safe)


def scores_from_confusion(tp, fp, fn, tn):
    """The six challenge metrics from counts; scalars in -> floats out, arrays in -> arrays out."""
    tp = np.asarray(tp)
    jaccard = _ratio(tp, tp + fp + fn)
    out = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "jaccard": jaccard,
        "threshold_jaccard": np.where(jaccard >= JACCARD_CUTOFF, jaccard, 0.0),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
    }
    if np.ndim(tp) == 0:
        return {k: float(v) for k, v in out.items()}
    return out


def image_scores(truth, pred):
    """Per-image challenge metrics of boolean masks: (H, W) -> dict of floats, (N, H, W) ->
    dict of arrays."""
    return scores_from_confusion(*confusion(truth, pred))


# --- the uncertainty and the review flag ----------------------------------------------------------
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
    `review_at`, the model's review threshold (None flags nothing)."""
    unsure = float(uncertainty(prob, threshold))
    return {"uncertainty": unsure, "review": int(review_at is not None and unsure > review_at)}


def choose_review_threshold(uncertainties, share=REVIEW_SHARE):
    """The lowest threshold (one of the values) that flags at most `share` of these photos; a photo
    is flagged when its uncertainty is over it. None for no photos."""
    values = np.sort(np.asarray(uncertainties, np.float64))
    if not len(values):
        return None
    return float(values[len(values) - int(share * len(values)) - 1])


# --- how well the flag finds the failures ---------------------------------------------------------
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
