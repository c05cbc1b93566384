"""Masks for new photos, from a .keras model or an export (SavedModel, .tflite, .onnx).

    python predict.py --weights best.keras --data photos/ --out masks/

For each photo: <id>_segmentation.png (0/255 at native size, the ISIC submission format),
<id>_overlay.jpg (at most 1024 px) and a predictions.csv row, with the photo's uncertainty and
review flag (extras/review.py). --data is a folder of photos, one photo, a data folder (masks
ignored) or an ISIC 2024 HDF5 archive (extras/archive.py). Read top to bottom: the Predictor and
its loaders, predicting, one photo (shared with app.py), photos in bulk (through
extras/pipeline.py, shared with evaluate.py), the command line. docs/evaluation.md has more.
"""
import csv
import json
import os
import sys
import time

import numpy as np
from PIL import Image

import common
import data

# --- Predictor: one interface over .keras and the exported formats ---------------------------

class Predictor:
    """predict(uint8 (N, S, S, 3) raw RGB) -> float32 (N, S, S) foreground probability.
    review_threshold and review_source: set by load_predictor (extras/review.py's with_review)."""
    review_threshold, review_source = None, None

    def __init__(self, path, kind, size, run_batch, batch=8):
        self.path, self.kind, self.size = path, kind, size
        self.batch = batch  # images per call: amortizes per-call overhead without much memory
        self._run_batch = run_batch

    def predict(self, images):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"expected (N, {self.size}, {self.size}, 3) images, "
                             f"got {images.shape}")
        out = [self._run_batch(images[i:i + self.batch])
               for i in range(0, len(images), self.batch)]
        probs = np.concatenate(out) if out else np.zeros((0, self.size, self.size), np.float32)
        return probs.reshape(len(images), self.size, self.size).astype(np.float32, copy=False)


def square_size(shape, path, size, default_size=None):
    """The input size from the shape (N, H, W, 3): `size` must match a fixed one; `size`, else
    `default_size` (run.json's training size), fills a dynamic one."""
    if len(shape) != 4 or shape[-1] not in (3, None):
        raise common.Error(path, f"model input shape {tuple(shape)} is not (N, H, W, 3)")
    h, w = shape[1], shape[2]
    if h is None or w is None or h < 0 or w < 0:
        size = size if size is not None else default_size
        if size is None:
            raise common.Error(path, "model accepts any input size; pass --size PX "
                                     "(or keep run.json beside it)")
        return int(size)
    if h != w:
        raise common.Error(path, f"model input is {h}x{w}, expected a square input")
    if size is not None and int(size) != h:
        raise common.Error(path, f"model input is {h}x{w}, --size {size} does not match")
    return int(h)


def load_keras(path):
    """A .keras file as a Keras model (no compile: a bare session needs nothing of this repo)."""
    keras = common.import_keras()
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # corrupt zip, not a model, unknown layer...
        raise common.Error(path, f"cannot load Keras model ({common.one_line(e)})") from None


def _predictor(path, kind, shape, run, size, default_size=None, batch=None):
    """A Predictor around run, after one dry run: a wrong model fails here in one line."""
    size = square_size(shape, path, size, default_size)
    try:
        y = np.asarray(run(np.zeros((1, size, size, 3), np.uint8)))
    except Exception as e:
        raise common.Error(path, f"model failed on a {size}x{size} input "
                                 f"({common.one_line(e)})") from None
    if y.size != size * size:
        raise common.Error(path, f"model output shape {y.shape} is not one {size}x{size} map")
    return Predictor(path, kind, size, run, batch=batch or 8)


def _keras_run(model):
    def run(x):
        y = model.predict_on_batch(x.astype(np.float32))
        if isinstance(y, dict):
            y = y["mask"] if "mask" in y else next(iter(y.values()))
        return np.asarray(y, np.float32)
    return run


RELEASED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "skin_unet.keras")


def read_run_json(weights):
    """train.py's run.json beside the weights (or one folder up for an export), else {}; the
    released model's is models/skin_unet.json (the quick start's run.json here is not its own)."""
    if os.path.abspath(weights) == RELEASED:
        candidates = [os.path.splitext(RELEASED)[0] + ".json"]
    else:
        here = weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights))
        candidates = [os.path.join(folder, "run.json") for folder in (here, os.path.dirname(here))]
    for path in candidates:
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    run = json.load(f)
            except (OSError, ValueError) as e:
                raise common.Error(path, f"unreadable JSON ({common.one_line(e)})") from None
            return {**run, "_path": path}
    return {}


def load_predictor(path=None, size=None, review_threshold=None):
    """A Predictor for a .keras file or an export; None: the released model (models/README.md).
    `size`: only for a model of any input size, which otherwise takes run.json's training size.
    `review_threshold` overrides the one stored with the model (extras/review.py's with_review)."""
    from extras import review  # the review flag's threshold

    released = path is None or os.path.abspath(path) == RELEASED
    path = RELEASED if released else os.fspath(path)
    try:
        run = read_run_json(path)
        predictor = _load(path, size, run.get("size"))
    except common.Error as e:
        if not released:
            raise
        # The remedy first: a library's message behind it may be long (one_line cuts it).
        raise common.Error(e.file, "the released model cannot be used: restore it with "
                                   f"`git checkout models/` ({e.problem})") from None
    return review.with_review(predictor, run, review_threshold)


def _load(path, size, default_size):
    if not os.path.exists(path):
        raise common.Error(path, "model file not found")
    if path.endswith(".keras"):
        model = load_keras(path)
        return _predictor(path, "keras", model.input_shape, _keras_run(model), size, default_size)
    from extras import formats  # the exported formats
    kind, shape, run, batch = formats.open_exported(path)
    return _predictor(path, kind, shape, run, size, default_size, batch)


# --- Predicting: TTA and post-processing, the one path every prediction takes ---------------
POST = ("none", "fill", "largest", "fill+largest")


def predict_probs(predictor, images, tta=False, post="none", threshold=0.5):
    """Probabilities (N, S, S) at the model's size, every prediction's one path: with tta the mean
    of identity, h-flip and v-flip; then --post (extras/postprocess.py)."""
    probs = predictor.predict(images)
    if tta:
        probs = probs + predictor.predict(images[:, :, ::-1])[:, :, ::-1]
        probs = probs + predictor.predict(images[:, ::-1])[:, ::-1]
        probs = probs / 3.0
    if post not in POST:
        raise ValueError(f"post {post!r} is not one of {', '.join(POST)}")
    if post == "none":
        return probs
    from extras import postprocess  # --post
    return np.stack([postprocess.postprocess(p, threshold, post) for p in probs])


# --- One photo: the functions the bulk path below, evaluate.py and the web app share ---------
PREVIEW_SIDE = 1024  # px, long side of overlays and of what the web page shows
BAND_ROWS = 256  # rows of a native-size map worked out at a time (see native_prob)


def model_input(image, size):
    """The size x size squash the model sees (the one evaluate.py's scores are measured on)."""
    return data.resize_image(image, (size, size))


def native_prob(small_prob, size_hw, threshold=0.5):
    """(figures, bool mask at size_hw) of the model-size map, resized (bilinear) a band of rows
    at a time from the whole map's sampling grid: one resize's mask, but the float32 map of a
    50-megapixel photo (200 MB) is never whole."""
    h, w = size_hw
    source = Image.fromarray(np.asarray(small_prob, np.float32))
    mask = np.empty((h, w), bool)
    area, inside = 0, 0.0
    for top in range(0, h, BAND_ROWS):
        bottom = min(h, top + BAND_ROWS)
        box = (0, top * source.height / h, source.width, bottom * source.height / h)
        band = np.asarray(source.resize((w, bottom - top), Image.BILINEAR, box=box))
        hit = np.greater(band, threshold, out=mask[top:bottom])
        area += int(np.count_nonzero(hit))
        inside += float(np.sum(band, where=hit, dtype=np.float64))
    # The mask's figures: its area in pixels and in % of the photo, the mean probability inside.
    figures = {"area_px": area, "area_percent": 100.0 * area / (h * w) if h * w else 0.0,
               "mean_prob": inside / area if area else 0.0, "width": int(w), "height": int(h)}
    return figures, mask


def decode_preview(file, native, raw=None):
    """The photo as uint8 (h, w, 3), its long side at most PREVIEW_SIDE (never enlarged): a JPEG
    decodes in draft mode at the smallest scale that still covers it, so full-resolution pixels
    are never decoded."""
    scale = min(1.0, PREVIEW_SIDE / max(native))
    hw = max(1, round(native[0] * scale)), max(1, round(native[1] * scale))
    return data.resize_image(data.load_image(file, min_size=hw, raw=raw), hw)


def save_mask_png(folder, image_id, pred):
    # ISIC submission format: 8-bit greyscale, 0/255, native size, <id>_segmentation.png.
    image = Image.fromarray(pred.astype(np.uint8) * 255, mode="L")
    common.atomic_write(os.path.join(folder, f"{image_id}_segmentation.png"),
                        lambda f: image.save(f, format="PNG", compress_level=1))


# --- Photos in bulk --------------------------------------------------------------------------
COLUMNS = ("image_id", "file", "width", "height", "area_px", "area_percent", "mean_prob",
           "uncertainty", "review")
DECIMALS = {"area_percent": ".4f", "mean_prob": ".6f", "uncertainty": ".6f"}  # in predictions.csv
OUTPUT_SUFFIXES = ("_segmentation", "_overlay")  # our own outputs, never photos to segment
HDF5_SUFFIXES = (".hdf5", ".h5")  # an ISIC 2024 archive; its photos are "archive.hdf5:<key>"


def find_photos(source):
    """[(image_id, file)]: one photo, a folder of photos (not recursive, not our own outputs), a
    data folder (every image, masks ignored) or an archive."""
    if os.path.isfile(source) and source.lower().endswith(HDF5_SUFFIXES):
        from extras import archive  # h5py, only for an archive
        return archive.find_photos(source)
    image_id = lambda path: os.path.splitext(os.path.basename(path))[0]
    if os.path.isfile(source):
        return [(image_id(source), source)]
    if not os.path.isdir(source):
        raise common.Error(source, "no such file or folder")
    layout = data.layout_of(source)
    if layout:
        folders = [os.path.join(source, folder) for _, folder, _ in data.LAYOUTS[layout]]
        files = [p for folder in folders for p in data.image_files(folder)]
    else:
        files = [p for p in data.image_files(source)
                 if not image_id(p).lower().endswith(OUTPUT_SUFFIXES)]
    if not files:
        raise common.Error(source, "no images found")
    return [(image_id(p), p) for p in sorted(files)]


def _decode_photo(reader, image_id, file, size):
    """(image_id, file, native (h, w), preview, model input) or a problem dict, and seconds. One
    draft decode at the preview's size serves the overlay and the model; native size: the header."""
    t = time.perf_counter()
    try:
        raw = reader.raw(file) if reader else None  # an archive's photo: bytes from it
        native = data.native_hw(file, raw)  # a bad file fails here, as one line naming it
        preview = decode_preview(file, native, raw)
    except common.Error as e:
        return {"file": e.file, "problem": e.problem}, time.perf_counter() - t
    except (OSError, KeyError) as e:
        problem = f"cannot read ({common.one_line(e)})"
        return {"file": file, "problem": problem}, time.perf_counter() - t
    return (image_id, file, native, preview, model_input(preview, size)), time.perf_counter() - t


def _write_prediction(folder, image_id, file, native, preview, small_prob, threshold, overlays,
                      review_at):
    """Mask at native size, overlay preview and the CSV row of one photo; a thread runs it."""
    from extras import review  # each photo's uncertainty and review flag

    t = time.perf_counter()
    stats, mask = native_prob(small_prob, native, threshold)
    stats.update(review.flag(small_prob, threshold, review_at))
    save_mask_png(folder, image_id, mask)
    if overlays:
        from extras import overlay  # on unless --no-overlay
        overlay.write(folder, image_id, preview, small_prob, threshold)
    return {"image_id": image_id, "file": file, **stats}, time.perf_counter() - t


def predict_photos(predictor, photos, out, threshold=0.5, tta=False, post="none", overwrite=False,
                   overlays=True, progress=True, workers=None):
    """Segment find_photos' list into `out`: masks, overlays and predictions.csv rows (appended and
    flushed in photo order). Photos an earlier run finished are skipped unless overwrite; a bad
    file is a problem, skipped. Returns counts, not rows, so memory stays flat over an archive."""
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "predictions.csv")
    finished = set()
    if overwrite or not os.path.exists(csv_path):
        common.atomic_write(csv_path, lambda f: f.write(",".join(COLUMNS).encode() + b"\n"))
    else:  # an earlier run's: keep what it finished
        from extras import archive
        finished = archive.finished(out, csv_path, COLUMNS)
    problems, seen = [], {}
    for image_id, file in photos:
        if image_id in seen:  # a.jpg and a.png would write the same <id>_segmentation.png
            problem = f"duplicate id {image_id} (already {seen[image_id]}); skipped"
            problems.append({"file": file, "problem": problem})
        seen.setdefault(image_id, file)
    todo = [(image_id, file) for image_id, file in seen.items() if image_id not in finished]
    reader = None
    if todo and todo[0][1].rpartition(":")[0].lower().endswith(HDF5_SUFFIXES):  # one source
        from extras import archive
        reader = archive.Reader()
    timing = dict.fromkeys(("decode", "predict", "write"), 0.0)
    bar = common.Progress(len(todo), "predict", progress)
    done, flagged, started = 0, 0, time.perf_counter()
    from extras import pipeline
    try:
        with open(csv_path, "a", newline="") as rows:
            writer = csv.DictWriter(rows, COLUMNS, extrasaction="ignore", lineterminator="\n")
            for _, (row, seconds) in pipeline.overlap(  # decode, predict, write side by side
                    todo, lambda item: _decode_photo(reader, *item, predictor.size),
                    lambda d, prob: _write_prediction(out, *d[:-1], prob, threshold, overlays,
                                                      predictor.review_threshold),
                    lambda x: predict_probs(predictor, x, tta, post, threshold), predictor.batch,
                    timing, problems, bar, workers):
                # One line, one write: a kill leaves whole rows behind.
                writer.writerow({**row, **{k: format(row[k], f) for k, f in DECIMALS.items()}})
                rows.flush()
                timing["write"] += seconds
                done += 1
                flagged += row["review"]
                bar.update()
    finally:
        if reader:
            reader.close()
    timing["total"] = time.perf_counter() - started
    return {"done": done, "flagged": flagged, "skipped_existing": len(seen) - len(todo),
            "problems": problems, "seconds": {k: round(v, 3) for k, v in timing.items()}}


# --- Command line ----------------------------------------------------------------------------
def model_parser(description):
    """The flags of running a model, shared with evaluate.py; parse() checks them."""
    from extras import review  # --review-threshold's default

    p = common.ArgumentParser(description=description)
    p.add_argument("--weights", help=".keras file, SavedModel folder, .tflite or .onnx "
                   "(default: models/skin_unet.keras, the released model)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--tta", action="store_true", help="average identity, h-flip and v-flip")
    p.add_argument("--post", choices=POST, default="none",
                   help="fill holes and/or keep the largest lesion (docs/results.md measures them)")
    p.add_argument("--size", type=int, default=None, help="input size for a size-agnostic model")
    p.add_argument("--review-threshold", type=float, default=None, metavar="U",
                   help="flag photos whose uncertainty is over U (default: the one stored with "
                   f"the model, else {review.REVIEW_THRESHOLD})")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse(parser, argv):
    args = parser.parse_args(argv)
    for flag in ("threshold", "review_threshold"):
        value = getattr(args, flag)
        if value is not None and not 0.0 <= value <= 1.0:
            raise common.Error(f"--{flag.replace('_', '-')} {value}", "must be within [0, 1]")
    return args


@common.command
def main(argv=None):
    p = model_parser(__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a folder of photos, one photo, a data folder "
                   "(every image, masks ignored) or an ISIC 2024 HDF5 archive")
    p.add_argument("--out", required=True,
                   help="folder for the masks, overlays and predictions.csv")
    p.add_argument("--overwrite", action="store_true", help="redo photos an earlier run finished")
    p.add_argument("--no-overlay", dest="overlays", action="store_false",
                   help="masks and rows only")
    args = parse(p, argv)
    photos = find_photos(args.data)
    predictor = load_predictor(args.weights, args.size, args.review_threshold)
    print(f"model {predictor.path} ({predictor.kind}, {predictor.size}px)   data {args.data} "
          f"({len(photos)} photos)", file=sys.stderr)
    result = predict_photos(predictor, photos, args.out, args.threshold, args.tta, args.post,
                            args.overwrite, args.overlays,
                            progress=not args.no_progress and sys.stderr.isatty())
    for problem in result["problems"]:
        print(f"skipped: {problem['file']}: {problem['problem']}", file=sys.stderr)
    if result["skipped_existing"]:
        print(f"{result['skipped_existing']} photos already done in {args.out} "
              "(--overwrite redoes them)")
    if not result["done"] and not result["skipped_existing"]:
        raise common.Error(args.data, "no photo could be segmented", exit_code=1)
    s = result["seconds"]
    print(f"predicted {result['done']} ({len(result['problems'])} skipped) in {s['total']:.2f}s "
          f"(predict {s['predict']:.2f}, decode {s['decode']:.2f}, "
          f"resize-back+write {s['write']:.2f})")
    print(f"review: {result['flagged']} of {result['done']} photos flagged, uncertainty over "
          f"{predictor.review_threshold:.3f} ({predictor.review_source}); predictions.csv has "
          "each photo's uncertainty and review (1: flagged)")
    overlays = ", <id>_overlay.jpg" if args.overlays else ""
    print(f"wrote {args.out}/: <id>_segmentation.png{overlays}, predictions.csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
