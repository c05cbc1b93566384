"""Which per-photo uncertainty finds the failed masks best: the measures issue 33 names, compared
on one scored split, and the review threshold the kept one (metrics.py's uncertainty) gets
there.

    python bench/review.py --data ../shared/data/isic2018 [--weights W] [--split val]
                           [--write models/skin_unet.json]

A failure is an image whose Jaccard at native size (evaluate.py's rows) is below 0.65. For each
measure: the AUROC for failures, and at the top 10 % and 15 % of photos flagged, the failures
caught and the thresholded Jaccard of the rest. Every measure reads the same model-size maps.
--write stores the threshold train.py's rule (metrics.choose_review_threshold: flag at most
metrics.REVIEW_SHARE of the split) picks, for a model without a run.json (the released one).
Choose on val; score test once. docs/results.md has the figures.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import evaluate  # noqa: E402
import inference  # noqa: E402
import metrics  # noqa: E402


def jaccard(a, b):
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def measures(probs, views, threshold=0.5):
    """{name: per-photo values, higher = less sure} from (N, S, S) maps and their flip views."""
    masks = probs > threshold
    area = masks.sum((1, 2))
    inside = np.where(masks, probs, 0).sum((1, 2))
    band = ((probs > 0.1) & (probs < 0.9)).sum((1, 2))
    frame = np.concatenate([masks[:, 0], masks[:, -1], masks[:, :, 0], masks[:, :, -1]], 1)
    view_masks = [v > threshold for v in views]
    disagree = [1 - min(jaccard(m, v[i]) for v in view_masks) for i, m in enumerate(masks)]
    return {
        "1 - soft Jaccard (kept: metrics.uncertainty)": metrics.uncertainty(probs, threshold),
        "1 - mean foreground probability": np.where(area > 0, 1 - inside / np.maximum(area, 1), 1),
        "uncertain pixels (0.1-0.9) per mask pixel": band / np.maximum(area, 1),
        "flip disagreement (1 - min Jaccard, 3 predictions)": np.array(disagree),
        "mask touches the frame (share of border)": frame.mean(1),
        "1 - soft Jaccard of the 3-view TTA map (3 predictions)":
            metrics.uncertainty((probs + sum(views)) / 3, threshold),
    }


def at_share(values, failed, jac, share):
    flagged = np.zeros(len(values), bool)
    flagged[np.argsort(-values, kind="stable")[:int(share * len(values))]] = True
    kept = jac[~flagged]
    return failed[flagged].sum(), np.where(kept >= metrics.JACCARD_CUTOFF, kept, 0).mean()


@common.command
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--weights", default=None, help="default: the released model")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--write", default=None, metavar="JSON")
    args = p.parse_args(argv)
    predictor = inference.load_predictor(args.weights)
    run = inference.read_run_json(args.weights or inference.RELEASED)
    pairs, _, _ = evaluate.find_inputs(args.data, run.get("val_fraction", 0.1),
                                       run.get("test_fraction", 0.1))
    chosen = [q for q in pairs if q.split == args.split]
    summary = evaluate.evaluate(predictor, chosen, progress=False)
    jac = np.array([r["jaccard"] for r in summary["rows"]])
    ids = [r["image_id"] for r in summary["rows"]]
    by_id = {q.id: q for q in chosen}
    images = np.stack([evaluate._decode(by_id[i], predictor.size)[0].image for i in ids])
    probs = predictor.predict(images)
    views = [predictor.predict(images[:, :, ::-1])[:, :, ::-1],
             predictor.predict(images[:, ::-1])[:, ::-1]]
    failed = jac < metrics.JACCARD_CUTOFF
    print(f"{predictor.path}, {args.data} {args.split}: {len(jac)} images, {failed.sum()} failures "
          f"(Jaccard < {metrics.JACCARD_CUTOFF}); thresholded Jaccard of all "
          f"{np.where(failed, 0, jac).mean():.4f}\n")
    print("| measure | AUROC | caught, 10 % flagged | rest thr. J | caught, 15 % | rest thr. J |")
    print("|---|---|---|---|---|---|")
    for name, values in measures(probs, views).items():
        c10, k10 = at_share(values, failed, jac, 0.10)
        c15, k15 = at_share(values, failed, jac, 0.15)
        auc = metrics.auroc(values, failed)  # None: no failures (or nothing but) in this split
        print(f"| {name} | {'n/a' if auc is None else format(auc, '.3f')} | {c10}/{failed.sum()} | "
              f"{k10:.3f} | {c15}/{failed.sum()} | {k15:.3f} |")
    threshold = metrics.choose_review_threshold(metrics.uncertainty(probs))
    print(f"\nreview threshold flagging at most {metrics.REVIEW_SHARE:.0%} of this split: "
          f"{threshold:.4f}")
    if args.write:
        record = {"review_threshold": threshold, "review_share": metrics.REVIEW_SHARE,
                  "chosen_on": f"{os.path.basename(os.path.normpath(args.data))} {args.split}, "
                               f"{len(jac)} images",
                  "command": "python bench/review.py " + " ".join(argv or sys.argv[1:])}
        text = json.dumps(record, indent=1) + "\n"
        common.atomic_write(args.write, lambda f: f.write(text.encode()))
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
