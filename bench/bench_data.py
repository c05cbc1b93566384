"""Data pipeline benchmark: cache build (cold and warm), augmented batches per second, and the host
side of the GPU feed.

    python bench/bench_data.py [ISIC2018_DIR] [ISIC2017_FULLRES_DIR] [--size 256] [--batch 16]

Uses a fresh cache folder under /tmp (removed afterwards) so the first build is really cold.
The feed rate is measured the way model.fit consumes it: Batches with worker threads. The last line,
`host feed: N images/s`, is what the host does when the accelerator augments (Batches.draw: gather,
random draws, the uint8 batch handed over; no pixel work), on one thread at 256 px, batch 64, on the
first data set: the goal is >= 5,000 images/s, so that a GPU's 16 cores are never the limit.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402
import data  # noqa: E402
import imaging  # noqa: E402
import layouts  # noqa: E402


def feed_rate(arrays, batch, n_batches, workers):
    """Images/s of augmented batches from `workers` threads each calling Batches[i], as fit's
    PyDataset workers do (one epoch of n_batches batches)."""
    idx = np.arange(batch * n_batches) % len(arrays.images)  # tiny sets: repeat to fill
    batches = data.Batches(arrays.images[idx], arrays.masks[idx], batch_size=batch, seed=0)
    done, start = 0, time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for x, _ in pool.map(batches.__getitem__, range(len(batches))):
            done += len(x)
    return done / (time.perf_counter() - start)


def single_thread_rate(arrays, batch, seconds):
    rng, done, start = np.random.default_rng(0), 0, time.perf_counter()
    n = len(arrays.images)
    while time.perf_counter() - start < seconds:
        idx = rng.integers(0, n, batch)
        data.augment_batch(arrays.images[idx], arrays.masks[idx], rng)
        done += batch
    return done / (time.perf_counter() - start)


def host_feed_rate(images, masks, batch=64, seconds=5.0, threads=1):
    """Images/s of Batches.draw (gather, draws, uint8 hand-over) on `threads` threads: the host's
    whole share of the device-augmented feed. gpu_bench.py's feed stage measures it this way too."""
    batches = data.Batches(images, masks, batch, drop_remainder=True, seed=0)
    n, start = len(batches), time.perf_counter()

    def draw_for(seconds, first):  # each thread draws batch after batch, as a PyDataset worker does
        done = 0
        while time.perf_counter() - start < seconds:
            batches.draw((first + done) % n)
            done += 1
        return done

    # (a pool.map per batch would time the hand-over between threads too: 30% of the figure here)
    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(draw_for, [seconds] * threads, [i * n // threads for i in range(threads)]))
    return done * batch / (time.perf_counter() - start)


def bench(root, args):
    pairs, problems, layout = layouts.find_pairs(root)
    print(f"\n{root}: {layout}, {len(pairs)} pairs, {len(problems)} problems")
    cache = tempfile.mkdtemp(prefix="bench-data-cache-", dir="/tmp")
    try:
        t = time.perf_counter()
        arrays = data.load_arrays(pairs, args.size, cache=cache, workers=args.workers)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        arrays = data.load_arrays(pairs, args.size, cache=cache, workers=args.workers, progress=False)
        warm = time.perf_counter() - t
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    sizes = np.array([imaging.native_hw(p.image) for p in pairs])
    print(f"  native sizes {sizes[:, 1].min()}x{sizes[:, 0].min()} .. "
          f"{sizes[:, 1].max()}x{sizes[:, 0].max()} (WxH), cached at {args.size}x{args.size}")
    print(f"  cache build cold: {cold:6.2f} s  ({len(pairs) / cold:6.1f} pairs/s)")
    print(f"  cache load  warm: {warm:6.2f} s  ({len(pairs) / warm:6.1f} pairs/s)")
    one = single_thread_rate(arrays, args.batch, args.seconds)
    print(f"  augment_batch, 1 thread : {one:7.1f} images/s  ({one / args.batch:5.1f} batches/s "
          f"of {args.batch}; {1000 / one:.2f} ms/image)")
    rate = feed_rate(arrays, args.batch, args.batches, args.workers)
    print(f"  Batches, {args.workers} worker threads: {rate:7.1f} images/s  "
          f"({rate / args.batch:5.1f} batches/s of {args.batch})")
    return arrays


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("isic2018", nargs="?",
                        default=os.path.join(REPO, "..", "shared", "data", "isic2018"))
    parser.add_argument("isic2017", nargs="?",
                        default=os.path.join(REPO, "..", "shared", "data", "isic2017-fullres"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="single-thread measurement")
    parser.add_argument("--batches", type=int, default=64, help="batches in the feed measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    from machine import cpu_line  # imports no Keras
    print(f"{cpu_line()}; size {args.size}, batch {args.batch}")
    first = None
    for root in (args.isic2018, args.isic2017):
        try:
            arrays = bench(os.path.normpath(root), args)
            first = first or (root, arrays)
        except common.Error as e:
            print(f"error: {e}", file=sys.stderr)
    if first is None:
        sys.exit("error: no data set could be read (give ISIC2018_DIR)")
    if args.size != 256:
        first = (first[0], data.load_split(first[0], "all", 256, progress=False))
    print(f"GPU feed, host side (Batches.draw, 1 thread, 256 px, batch 64, {first[0]}):")
    print(f"host feed: {host_feed_rate(first[1].images, first[1].masks):.0f} images/s")


if __name__ == "__main__":
    main()
