"""Which decision threshold, post-processing and test-time augmentation, measured on the val split.

    python bench/sweep_val.py --weights best.keras [--data DIR] [--split val]

Predicts every image once without and once with TTA (inference.predict_probs, the one prediction
path), then applies each post-processing (extras/postprocess.py) and threshold to the model-size
probabilities, resizes back to the mask's native size and scores as evaluate.py does (per-image
Dice and the challenge's thresholded Jaccard, mean over images). Choose on val; read test once.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import imaging  # noqa: E402
import inference  # noqa: E402
import layouts  # noqa: E402
import metrics  # noqa: E402
from extras import postprocess  # noqa: E402

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


@common.command  # a bad model or data folder: one line, not a traceback
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--data", default=None, help="default: run.json's training data")
    p.add_argument("--split", default="val", choices=("val", "test"))
    args = p.parse_args(argv)
    run = inference.read_run_json(args.weights)
    roots = [args.data] if args.data else layouts.folders_of(run.get("data"))  # a multi-source run: all of them
    if not roots:
        sys.exit(f"error: {args.weights}: no run.json with the training data beside it; give --data DIR")
    root = ", ".join(roots)
    predictor = inference.load_predictor(args.weights)
    pairs = [q for r in roots for q in layouts.find_pairs(r, run.get("val_fraction", 0.1), run.get("test_fraction", 0.1))[0]
             if q.split == args.split]
    size = predictor.size
    images = np.stack([imaging.resize_image(imaging.read_image(q.image, min_size=(size, size))[0], (size, size))
                       for q in pairs])
    truths = [imaging.load_mask(q.mask) for q in pairs]
    scores = {}
    for tta in (False, True):
        probs = inference.predict_probs(predictor, images, tta=tta)
        for post in inference.POST:
            for threshold in THRESHOLDS:
                rows = []
                for prob, truth in zip(probs, truths):
                    small = postprocess.postprocess(prob, threshold, post)
                    pred = imaging.resize_prob(small, truth.shape) > threshold
                    rows.append(metrics.image_scores(truth, pred))
                scores[tta, post, threshold] = {k: float(np.mean([r[k] for r in rows]))
                                                for k in ("dice", "threshold_jaccard")}
    base = scores[False, "none", 0.5]
    print(f"{args.weights} on {root} {args.split} ({len(pairs)} images, {size} px)")
    print(f"{'tta':<6}{'post':<14}{'threshold':>10}{'dice':>9}{'thr-jacc':>10}{'d dice':>9}{'d thr-jacc':>12}")
    for (tta, post, threshold), s in sorted(scores.items(), key=lambda kv: -kv[1]["threshold_jaccard"]):
        print(f"{str(tta):<6}{post:<14}{threshold:>10.1f}{s['dice']:>9.4f}{s['threshold_jaccard']:>10.4f}"
              f"{s['dice'] - base['dice']:>+9.4f}{s['threshold_jaccard'] - base['threshold_jaccard']:>+12.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
