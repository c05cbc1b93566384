"""Where predict.py's time goes on a photo archive: each stage of one photo, timed alone on one
thread, in CPU milliseconds per photo (the pipeline overlaps them on the cores).

    python bench/archive_split.py /tmp/isic2024-like.hdf5 [--weights models/skin_unet_int8.tflite]

Stages, in the order predict.py runs them: read the JPEG bytes from the HDF5 file, read the
header (native size), decode (draft mode) and squash to the model's size, the model (a
single-thread LiteRT interpreter, or the model's own runtime), the mask at native size with its
figures, the uncertainty, the mask PNG (encoded in memory, then written as its own file with
predict.py's atomic write), and the overlay JPEG.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from machine import cpu_line  # noqa: E402

import imaging  # noqa: E402
import inference  # noqa: E402
import metrics  # noqa: E402
import predict  # noqa: E402
from extras import archive  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archive")
    p.add_argument("--weights", default=os.path.join(ROOT, "models", "skin_unet_int8.tflite"))
    p.add_argument("--photos", type=int, default=1000)
    args = p.parse_args(argv)
    predictor = inference.load_predictor(args.weights)
    files = [f for _, f in archive.find_photos(args.archive)][:args.photos]
    reader, times = archive.Reader(), {}

    def stage(name, fn, items):
        t = time.perf_counter()
        out = [fn(x) for x in items]
        times[name] = (time.perf_counter() - t) * 1e3 / len(items)
        return out

    raws = stage("read bytes (h5py)", reader.raw, files)
    natives = stage("header", lambda fr: imaging.native_hw(*fr), list(zip(files, raws)))
    previews = stage("decode (draft)", lambda a: predict.decode_preview(*a),
                     list(zip(files, natives, raws)))
    side = (predictor.size, predictor.size)
    inputs = stage("squash to model size", lambda im: imaging.resize_image(im, side), previews)
    probs = stage("model", lambda x: predictor.predict(x[None])[0], inputs)
    masks = stage("mask at native size", lambda a: predict.native_mask(*a)[0],
                  list(zip(probs, natives)))
    stage("uncertainty", lambda pr: metrics.flag(pr, 0.5, 0.2), probs)
    pngs = stage("mask PNG, encoded", archive.MaskArchive.encode, masks)
    with tempfile.TemporaryDirectory() as out:
        stage("mask PNG, own file (atomic)", lambda a: imaging.save_mask_png(out, *a),
              [(f"p{i}", m) for i, m in enumerate(masks)])
        stage("overlay JPEG", lambda a: predict.write_overlay(out, *a, 0.5),
              [(f"p{i}", pv, pr) for i, (pv, pr) in enumerate(zip(previews, probs))])
    reader.close()
    total = sum(times.values())
    print(f"{cpu_line()}; {len(files)} photos of {args.archive}; model {args.weights} "
          f"({predictor.kind}); mask PNG {np.mean([len(b) for b in pngs]):.0f} bytes")
    print("| stage | ms per photo | share |\n|---|---:|---:|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.3f} | {100 * ms / total:.1f}% |")
    print(f"| all, one after another | {total:.3f} | 100% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
