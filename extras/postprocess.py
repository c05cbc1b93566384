"""Post-processing of a model-size probability map (--post of predict.py, evaluate.py and app.py):
"fill" fills holes in the lesion, "largest" keeps its largest connected part. docs/results.md
measures both on val. predict.predict_probs imports this module only when --post is not "none".
"""
import numpy as np


def label(mask):
    """4-connected components of a bool (H, W) mask: int labels, 0 off the mask. Each pass gives a
    pixel the smallest label among itself and its neighbours, then jumps every label to its own
    pixel's label, so chains collapse quickly; done when a pass changes nothing."""
    h, w = mask.shape
    none = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        smallest = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1],
                                      padded[1:-1, :-2], padded[1:-1, 2:]])
        smallest = np.where(mask, smallest, none)
        flat = np.append(smallest.ravel(), none)
        jumped = np.where(mask, flat[np.minimum(smallest, none) - 1], none)
        if np.array_equal(jumped, labels):
            return np.where(mask, labels, 0)
        labels = jumped


def postprocess(prob, threshold=0.5, post="none"):
    """Clean one model-size probability map: "fill" sets holes in the lesion (background that does
    not reach the border) to 1, "largest" sets every lesion component but the largest to 0. The
    probabilities are edited rather than a binary mask, so the resize to native size and the
    threshold that follow stay the one path they are without post-processing."""
    prob = np.array(prob, np.float32)  # (predict.predict_probs checks post against predict.POST)
    if "fill" in post:
        background = label(prob <= threshold)
        edges = (background[0], background[-1], background[:, 0], background[:, -1])
        border = np.unique(np.concatenate(edges))
        prob[(background > 0) & ~np.isin(background, border)] = 1.0
    if "largest" in post:
        lesion = label(prob > threshold)
        if lesion.any():
            sizes = np.bincount(lesion.ravel())
            sizes[0] = 0
            prob[(lesion > 0) & (lesion != sizes.argmax())] = 0.0
    return prob
