"""evaluate.py for a model trained on several data sets (train.py --data A --data B): without
--data, evaluate.py scores each folder run.json names, then all of them together. evaluate.main
brings this module in only when run.json names more than one folder.

    <out>/<name>/metrics.csv, summary.json, grid_*.png    each source, as a one-source run writes
    <out>/summary.json                                    all the images together (one prediction
                                                          per image), each source's headline inside
"""
import json
import os
import sys

import data
from extras import review


def score_sources(evaluate, predictor, roots, args, run, fractions, progress):
    """Score and print every source, then all of them together; returns the exit code (0).
    evaluate: the running evaluate module (passed, not imported: it may be the script)."""
    names = data.source_names(roots)
    summaries = {}
    for name, root in zip(names, roots):
        out = os.path.join(args.out, name)
        summaries[name] = evaluate.score_folder(predictor, root, args, run, fractions, out,
                                                progress, source=name)
        print(f"\n{name}: {root}")
        evaluate.print_table(summaries[name])
    print(f"\nall {len(roots)} sources together")
    evaluate.print_table(together(evaluate, summaries, roots, args, run, fractions, predictor))
    print(f"wrote {args.out}/: summary.json (all together, and per source), and per source "
          f"({', '.join(names)}) <name>/metrics.csv, summary.json, grid_best/worst/random.png"
          f"{evaluate.masks_note(args, summaries.values())}", file=sys.stderr)
    return 0


def together(evaluate, summaries, roots, args, run, fractions, predictor):
    """Every source's images scored together (aggregated from the per-source rows: one
    prediction per image), each source's headline inside; written to <out>/summary.json."""
    every = summaries.values()
    headline = ("data", "layout", "images", *evaluate.METRICS, "median", "pooled", "worst")
    stages = ("decode", "predict", "score", "write", "total")
    rows = [row for s in every for row in s["rows"]]
    summary = evaluate.summarize(rows)
    review_at = predictor.review_threshold if predictor.review_threshold is not None else 1.0
    summary.update({
        "review": {**review.review_figures(rows, review_at, evaluate.JACCARD_CUTOFF),
                   "source": predictor.review_source},
        "data": [os.path.abspath(r) for r in roots], "split": args.split,
        "val_fraction": fractions[0], "test_fraction": fractions[1], "run_json": run.get("_path"),
        "model": predictor.path, "model_format": predictor.kind, "size": predictor.size,
        "threshold": args.threshold, "tta": args.tta, "post": args.post,
        "problems": [p for s in every for p in s["problems"]],
        "seconds": {k: round(sum(s["seconds"][k] for s in every), 3) for k in stages},
        "sources": {name: {k: s[k] for k in headline} for name, s in summaries.items()},
    })
    evaluate.write_bytes(os.path.join(args.out, "summary.json"),
                         (json.dumps(summary, indent=2) + "\n").encode())
    return summary
