"""The command line of data.py: `python data.py DIR` checks a data folder (layout, pairs per
split, native image sizes, every problem) and builds its cache; `python data.py --synthetic OUT`
writes a synthetic set (extras/synthetic.py). data.main hands its argv here, so this module is
read only when data.py runs as a command. docs/data.md.
"""
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import common
import data


def _report(root, arrays, layout, args):
    """The --json object (the human output prints the same)."""
    splits = {s: sum(p.split == s for p in arrays.pairs) for s in ("train", "val", "test")}
    sizes = None
    if arrays.pairs:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            shapes = np.array(list(pool.map(data.native_hw, [p.image for p in arrays.pairs])))
        lo, hi = shapes.min(axis=0), shapes.max(axis=0)
        sizes = {"min_hw": [int(lo[0]), int(lo[1])], "max_hw": [int(hi[0]), int(hi[1])]}
    return {"root": os.path.abspath(root), "layout": layout, "pairs": len(arrays.pairs),
            "splits": splits, "image_sizes": sizes, "size": args.size,
            "val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
            "problems": arrays.problems}


@common.command
def main(argv=None):
    parser = common.ArgumentParser(description=data.__doc__.split("\n")[0])
    parser.add_argument("dir", nargs="?", help="data folder to check (and cache)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--strict", action="store_true", help="any problem is an error")
    parser.add_argument("--size", type=int, default=256, help="training size to check and cache")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--cache", default=None, help="cache folder (default: $SKIN_UNET_CACHE "
                                                      "or ~/.cache/skin-unet)")
    parser.add_argument("--synthetic", metavar="OUT", help="write a synthetic set to OUT")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=384,
                        help="with --synthetic: image width (height 3/4 of it)")
    args = parser.parse_args(argv)
    if args.synthetic:
        if args.width < 16:
            raise common.Error(f"--width {args.width}", "must be >= 16")
        if args.count < 1:
            raise common.Error(f"--count {args.count}", "must be >= 1")
        size_wh = (args.width, round(args.width * 3 / 4))
        from extras import synthetic
        synthetic.write_synthetic(args.synthetic, args.count, args.seed, size_wh)
        print(f"wrote {args.count} synthetic pairs ({size_wh[0]}x{size_wh[1]}) to {args.synthetic}")
        return 0
    if not args.dir:
        parser.error("give a data folder, or --synthetic OUT")
    if args.size < 1:
        raise common.Error(f"--size {args.size}", "must be positive")
    arrays = data.load_split(args.dir, "all", args.size, args.val_fraction, args.test_fraction,
                             cache=args.cache, strict=args.strict,
                             progress=not args.json and sys.stderr.isatty())
    layout = arrays.sources[0]["layout"]
    report = _report(args.dir, arrays, layout, args)
    if args.json:
        print(json.dumps(report))
    else:
        s = report["splits"]
        print(f"{report['root']}: {layout} layout, {report['pairs']} usable pairs "
              f"(train {s['train']}, val {s['val']}, test {s['test']})")
        if report["image_sizes"]:
            lo, hi = report["image_sizes"]["min_hw"], report["image_sizes"]["max_hw"]
            print(f"image sizes: {lo[1]}x{lo[0]} to {hi[1]}x{hi[0]} (WxH), "
                  f"cached at {args.size}x{args.size} (squashed)")
        print(f"problems: {len(report['problems'])}" + (" (skipped)" if report["problems"] else ""))
        for p in report["problems"]:
            print(f"  {p['file']}: {p['problem']}")
    if not arrays.pairs:
        raise common.Error(args.dir, "no usable pairs")
    return 0
