"""Peak memory of loading several data sets' train + val arrays, as train.py --data A --data B does.

    python bench/bench_memory.py [DIR ...] [--sizes 256 512] [--keep-cache DIR]

Each case runs in its own child process, so ru_maxrss is that case's peak alone (a parent's peak
never goes down). Each size runs twice: cold (decoding into an empty cache) and warm (reading the
cache). The cache goes to a fresh folder under /tmp, removed afterwards, unless --keep-cache.
Default data: ../shared/data/isic2018 and ../shared/data/ham10000 beside the repository.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from machine import cpu_line  # noqa: E402  (the CPU every benchmark names)

import data  # noqa: E402

DEFAULT_DATA = [os.path.join(REPO, "..", "shared", "data", name) for name in ("isic2018", "ham10000")]


def child(folders, size):
    """One case, in this process: load train and val of all folders, keep both alive, report."""
    start = time.perf_counter()
    train = data.load_split(folders, "train", size=size, progress=False)
    val = data.load_split(folders, "val", size=size, progress=False)
    arrays = sum(a.images.nbytes + a.masks.nbytes for a in (train, val))
    print(json.dumps({
        "size": size, "train": len(train.pairs), "val": len(val.pairs),
        "array_gb": round(arrays / 1e9, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),  # KiB on Linux
        "seconds": round(time.perf_counter() - start, 1),
        "sources": [{k: s[k] for k in ("path", "layout")} | {"train": tr["stop"] - tr["start"],
                                                             "val": s["stop"] - s["start"]}
                    for tr, s in zip(train.sources, val.sources)]}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="*", default=DEFAULT_DATA)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--keep-cache", default=None, help="cache folder to use and keep")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    dirs = [os.path.abspath(d) for d in args.dirs]
    for d in dirs:
        if not os.path.isdir(d):
            sys.exit(f"error: {d}: not found (the default is the development data in ../shared/data; give DIR ...)")
    if args.child is not None:
        child(dirs, args.child)
        return 0
    cache = args.keep_cache or tempfile.mkdtemp(prefix="skin-unet-bench-memory-")
    print(cpu_line())
    print(f"data: {', '.join(dirs)}; cache: {cache} (free: "
          f"{shutil.disk_usage(cache).free / 1e9:.0f} GB)", flush=True)
    try:
        for size in args.sizes:
            for phase in ("cold", "warm"):
                r = subprocess.run([sys.executable, os.path.abspath(__file__), *dirs, "--child", str(size)],
                                   capture_output=True, text=True, env={**os.environ, "SKIN_UNET_CACHE": cache})
                if r.returncode:
                    print(f"{size}px {phase}: failed: {r.stderr.strip()[-500:]}", flush=True)
                    return 1
                result = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"{size}px {phase}: {result['train']} train + {result['val']} val images, arrays "
                      f"{result['array_gb']:.2f} GB, peak RSS {result['peak_rss_gb']:.2f} GB, "
                      f"{result['seconds']:.0f} s", flush=True)
                print("  " + json.dumps(result), flush=True)
    finally:
        if not args.keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
