"""How much does native-resolution scoring (or, with --photos, prediction) cost on top of the model?

    python bench/bench_evaluate.py [--data ../shared/data/isic2017-fullres] [--size 256] [--filters 32]
    python bench/bench_evaluate.py --photos     # masks, overlays and predictions.csv, masks ignored

Runs a default-size U-Net (untrained weights: timing only) on the full-resolution ISIC 2017 images
(up to 4288x2848): evaluate.evaluate scores each at native size, or with --photos
predict.predict_photos writes each native-size mask, a 1024 px overlay and a predictions.csv row.
Compares the whole run with the model's own inference time on the same images (already decoded
and resized). Target: ratio <= 1.5.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import cpu_line  # noqa: E402  (the CPU every benchmark names)

import evaluate  # noqa: E402
import imaging  # noqa: E402
import inference  # noqa: E402
import layouts  # noqa: E402
import predict  # noqa: E402
import unet  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                            "data", "isic2017-fullres")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="images per predict call (default: "
                   "the Predictor's)")
    p.add_argument("--save-masks", action="store_true", help="also time writing the PNG masks")
    p.add_argument("--photos", action="store_true", help="time predict_photos (no ground truth)")
    args = p.parse_args()
    if not os.path.isdir(args.data):
        sys.exit(f"error: {args.data}: not found (the default is the development data in ../shared/data; "
                 "give --data DIR)")
    pairs, problems, layout = layouts.find_pairs(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "model.keras")
        unet.build_unet(size=args.size, filters=args.filters).save(weights)
        predictor = inference.load_predictor(weights)
        predictor.batch = args.batch or predictor.batch

        # The model's own time: the same images, already decoded and resized, same batching.
        images = np.stack([imaging.resize_image(imaging.read_image(q.image, min_size=(args.size,) * 2)[0],
                                                (args.size,) * 2) for q in pairs])
        predictor.predict(images)  # warm-up: traces the predict function for both batch shapes

        def run(selected, i):
            if args.photos:
                return predict.predict_photos(predictor, [(q.id, q.image) for q in selected],
                                              os.path.join(tmp, f"photos{i}"), progress=False)
            masks = os.path.join(tmp, "masks") if args.save_masks else None
            return evaluate.evaluate(predictor, selected, out=os.path.join(tmp, "eval"),
                                     save_masks=masks, progress=False)

        run(pairs[:1], "warm")  # warm-up: fonts, thread pools
        # Interleaved, so both see the same load on a shared machine; the best of each is kept.
        model_times, runs = [], []
        for i in range(args.repeats):
            model_times.append(_timed(lambda: predictor.predict(images)))
            runs.append(run(pairs, i)["seconds"])
        model_s = min(model_times)
        best = min(runs, key=lambda s: s["total"])

    megapixels = sum(h * w for h, w in (_mask_hw(q.mask) for q in pairs)) / 1e6
    print(cpu_line())
    print(f"{len(pairs)} images ({layout}), {megapixels:.1f} Mpx of masks, model {args.size}px "
          f"filters {args.filters}, batch {predictor.batch}, {os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"model inference alone  {model_s:6.2f} s")
    what = "predict_photos" if args.photos else "evaluate"
    stages = ", ".join(f"{k} {v:.2f}" for k, v in best.items() if k != "total")
    print(f"{what + ' total':<23}{best['total']:6.2f} s wall; stages (in threads alongside predict): {stages}")
    print(f"ratio total / model    {best['total'] / model_s:6.2f}   (target <= 1.5)")
    ratios = ", ".join(f"{r['total'] / m:.2f}" for r, m in zip(runs, model_times))
    print(f"per-repeat ratios      {ratios}   load average {os.getloadavg()[0]:.1f}")


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _mask_hw(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


if __name__ == "__main__":
    main()
