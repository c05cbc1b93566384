"""The command line of data.py: `python data.py DIR` checks a data folder (layout, pairs per
split, native image sizes, every problem) and builds its cache; `python data.py --synthetic OUT`
writes a synthetic set. data.main parses with parse(), builds the arrays (data.load_split, as a
training run does, so the cache is the one training reads) and hands them to report(). Nothing
here imports data.py. docs/data.md.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import common
import imaging
import layouts

# --help's first line, as data.py's has always read (data.py's docstring was it)
DESCRIPTION = "Everything between a folder on disk and batches a U-Net can train on."


def parse(argv):
    p = common.ArgumentParser(description=DESCRIPTION)
    p.add_argument("dir", nargs="?", help="data folder to check (and cache)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--strict", action="store_true", help="any problem is an error")
    p.add_argument("--size", type=int, default=256, help="training size to check and cache")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--cache", default=None, help="cache folder (default: $SKIN_UNET_CACHE "
                                                 "or ~/.cache/skin-unet)")
    p.add_argument("--synthetic", metavar="OUT", help="write a synthetic set to OUT")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=384,
                   help="with --synthetic: image width (height 3/4 of it)")
    args = p.parse_args(argv)
    if not args.synthetic and not args.dir:
        p.error("give a data folder, or --synthetic OUT")
    if not args.synthetic and args.size < 1:
        raise common.Error(f"--size {args.size}", "must be positive")
    return args


def write_synthetic(args):
    """--synthetic OUT: a synthetic set in the ISIC 2018 layout; the exit code."""
    if args.width < 16:
        raise common.Error(f"--width {args.width}", "must be >= 16")
    if args.count < 1:
        raise common.Error(f"--count {args.count}", "must be >= 1")
    size_wh = (args.width, round(args.width * 3 / 4))
    layouts.write_synthetic(args.synthetic, args.count, args.seed, size_wh)
    print(f"wrote {args.count} synthetic pairs ({size_wh[0]}x{size_wh[1]}) to {args.synthetic}")
    return 0


def check_report(args, arrays):
    """The --json object (the human output prints the same): arrays is data.Arrays of "all"."""
    splits = {s: sum(p.split == s for p in arrays.pairs) for s in ("train", "val", "test")}
    sizes = None
    if arrays.pairs:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            shapes = np.array(list(pool.map(imaging.native_hw, [p.image for p in arrays.pairs])))
        lo, hi = shapes.min(axis=0), shapes.max(axis=0)
        sizes = {"min_hw": [int(lo[0]), int(lo[1])], "max_hw": [int(hi[0]), int(hi[1])]}
    return {"root": os.path.abspath(args.dir), "layout": arrays.sources[0]["layout"],
            "pairs": len(arrays.pairs), "splits": splits, "image_sizes": sizes, "size": args.size,
            "val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
            "problems": arrays.problems}


def report(args, arrays):
    """Print the check (or its JSON); the exit code, or one line when no pair is usable."""
    report = check_report(args, arrays)
    if args.json:
        print(json.dumps(report))
    else:
        s = report["splits"]
        print(f"{report['root']}: {report['layout']} layout, {report['pairs']} usable pairs "
              f"(train {s['train']}, val {s['val']}, test {s['test']})")
        if report["image_sizes"]:
            lo, hi = report["image_sizes"]["min_hw"], report["image_sizes"]["max_hw"]
            print(f"image sizes: {lo[1]}x{lo[0]} to {hi[1]}x{hi[0]} (WxH), "
                  f"cached at {args.size}x{args.size} (squashed)")
        print(f"problems: {len(report['problems'])}" + (" (skipped)" if report["problems"] else ""))
        for problem in report["problems"]:
            print(f"  {problem['file']}: {problem['problem']}")
    if not arrays.pairs:
        raise common.Error(args.dir, "no usable pairs")
    return 0
