"""Issue 32's cheap levers, scored on val as evaluate.py scores (native size, official metrics):
dihedral test-time augmentation with 1, 3 or 8 views, and averaging checkpoints' weights.

    python bench/levers.py --data ../shared/data/isic2018 --weights A.keras [B.keras ...]
                           [--views 1 3 8] [--average]

Each model is scored with each number of views: 1 is the plain prediction, 3 predict.py's --tta
(identity, h-flip, v-flip), 8 the whole dihedral group (4 rotations, each also flipped; training
rotates by 90 degrees). --average also scores one model whose weights are the mean of all the given
models' (same architecture), batch-norm statistics included. Choose on val; read test once.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import evaluate  # noqa: E402
import inference  # noqa: E402


def dihedral(run, views):
    """run_batch averaged over `views` transforms of the input, each map mapped back."""
    transforms = [(k, flip) for k in range(4) for flip in (False, True)]
    chosen = {1: transforms[:1], 3: [(0, False), (0, True), (2, True)], 8: transforms}[views]

    def averaged(x):
        total = 0.0
        for k, flip in chosen:
            xi = np.rot90(x, k, axes=(1, 2))
            xi = xi[:, :, ::-1] if flip else xi
            y = np.asarray(run(np.ascontiguousarray(xi))).reshape(xi.shape[:3])
            y = y[:, :, ::-1] if flip else y
            total = total + np.rot90(y, -k, axes=(1, 2))
        return total / len(chosen)
    return averaged


def averaged_model(paths):
    models = [inference.load_keras(p) for p in paths]
    weights = [np.mean(ws, axis=0) for ws in zip(*(m.get_weights() for m in models))]
    models[0].set_weights(weights)
    return models[0]


@common.command
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--weights", nargs="+", required=True)
    p.add_argument("--views", nargs="+", type=int, default=[1, 3, 8], choices=(1, 3, 8))
    p.add_argument("--average", action="store_true")
    p.add_argument("--split", default="val", choices=("val", "test"))
    args = p.parse_args(argv)
    run = inference.read_run_json(args.weights[0])
    pairs, _, _ = evaluate.find_inputs(args.data, run.get("val_fraction", 0.1),
                                       run.get("test_fraction", 0.1))
    chosen = [q for q in pairs if q.split == args.split]
    models = [(w, inference.load_keras(w)) for w in args.weights]
    if args.average:
        models.append((f"mean of {len(args.weights)}", averaged_model(args.weights)))
    print(f"{args.data} {args.split}: {len(chosen)} images\n")
    print("| model | views | Dice | thresholded Jaccard | Jaccard |")
    print("|---|---|---|---|---|")
    for name, model in models:
        size = model.input_shape[1]
        for views in args.views:
            run_batch = dihedral(inference.keras_run(model), views)
            predictor = inference.Predictor(name, "keras", size, run_batch)
            s = evaluate.evaluate(predictor, chosen, progress=False)
            print(f"| {name} | {views} | {s['dice']:.4f} | {s['threshold_jaccard']:.4f} | "
                  f"{s['jaccard']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
