"""Masks for new photos, from any of the three model formats (.keras, a SavedModel folder, .tflite).

    python predict.py --weights best.keras --data photos/ --out masks/

For each photo: <id>_segmentation.png (0/255 at the photo's native size, the ISIC submission
format), <id>_overlay.jpg (the lesion tinted and outlined, at most 1024 px) and one row of
predictions.csv. --data is a folder of photos, one photo, a data folder (every image, masks
ignored) or an ISIC 2024 HDF5 archive (extras/archive.py, which also resumes an earlier run).

Read top to bottom: the Predictor and its loaders, predicting (TTA, post-processing), one photo
(shared with app.py), the pipeline that keeps the model busy (shared with evaluate.py), photos in
bulk, the command line. docs/evaluation.md ("Masks for new photos") has the rest.
"""
import csv
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

import common
import data

# ----------------------------------------------------------------------------------------------
# Predictor: one interface over .keras, SavedModel and .tflite


class Predictor:
    """predict(uint8 (N, S, S, 3) raw RGB) -> float32 (N, S, S) foreground probability."""

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
    """The model's input size from its input shape (N, H, W, 3). An explicit `size` must match a
    fixed input; `size` or else `default_size` (run.json's training size) fills a dynamic one."""
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
    """A Predictor around run, once the input shape gives its size and one dry run shows that it
    returns one size x size map: a wrong model fails here with one line, not mid-way."""
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


def read_run_json(weights):
    """train.py's run.json beside the weights (or one folder up for an export), else {}."""
    here = weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights))
    for folder in (here, os.path.dirname(here)):
        path = os.path.join(folder, "run.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    run = json.load(f)
            except (OSError, ValueError) as e:
                raise common.Error(path, f"unreadable run.json ({common.one_line(e)})") from None
            return {**run, "_path": path}
    return {}


def load_predictor(path, size=None):
    """A Predictor for a .keras file, a SavedModel folder or a .tflite file. `size` is only needed
    for a model that accepts any input size (it must match a fixed one); without it, such a model
    takes the training size from the run.json beside it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise common.Error(path, "model file not found")
    default_size = read_run_json(path).get("size")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise common.Error(path, "folder is not a SavedModel (no saved_model.pb)")
        from extras import formats
        shape, run, batch = formats.open_saved_model(path)
        return _predictor(path, "saved_model", shape, run, size, default_size, batch)
    if path.endswith(".tflite"):
        from extras import formats
        shape, run = formats.open_tflite(path)
        return _predictor(path, "tflite", shape, run, size)
    if path.endswith(".keras"):
        model = load_keras(path)
        return _predictor(path, "keras", model.input_shape, _keras_run(model), size, default_size)
    raise common.Error(path, "unknown model format (expected .keras, .tflite or a SavedModel "
                             "folder)")


# ----------------------------------------------------------------------------------------------
# Predicting: test-time augmentation and post-processing, the one path every prediction takes

POST = ("none", "fill", "largest", "fill+largest")


def predict_probs(predictor, images, tta=False, post="none", threshold=0.5):
    """Probabilities (N, S, S) at the model's size: with tta, the mean of identity, horizontal and
    vertical flips; then post-processed (see postprocess). Every path that predicts comes here."""
    probs = predictor.predict(images)
    if tta:
        probs = probs + predictor.predict(images[:, :, ::-1])[:, :, ::-1]
        probs = probs + predictor.predict(images[:, ::-1])[:, ::-1]
        probs = probs / 3.0
    if post == "none":
        return probs
    return np.stack([postprocess(p, threshold, post) for p in probs])


def label(mask):
    """4-connected components of a bool (H, W) mask: int labels, 0 off the mask. Each pass gives a
    pixel the smallest label among itself and its neighbours, then jumps every label to its own
    pixel's label, so chains collapse quickly; done when a pass changes nothing."""
    h, w = mask.shape
    none = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        smallest = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1],
                                      padded[1:-1, :-2], padded[1:-1, 2:]])
        smallest = np.where(mask, smallest, none)
        flat = np.append(smallest.ravel(), none)
        jumped = np.where(mask, flat[np.minimum(smallest, none) - 1], none)
        if np.array_equal(jumped, labels):
            return np.where(mask, labels, 0)
        labels = jumped


def postprocess(prob, threshold=0.5, post="none"):
    """Clean one model-size probability map: "fill" sets holes in the lesion (background that does
    not reach the border) to 1, "largest" sets every lesion component but the largest to 0. The
    probabilities are edited rather than a binary mask, so the resize to native size and the
    threshold that follow stay the one path they are without post-processing."""
    if post not in POST:
        raise ValueError(f"post {post!r} is not one of {', '.join(POST)}")
    prob = np.array(prob, np.float32)
    if "fill" in post:
        background = label(prob <= threshold)
        edges = (background[0], background[-1], background[:, 0], background[:, -1])
        border = np.unique(np.concatenate(edges))
        prob[(background > 0) & ~np.isin(background, border)] = 1.0
    if "largest" in post:
        lesion = label(prob > threshold)
        if lesion.any():
            sizes = np.bincount(lesion.ravel())
            sizes[0] = 0
            prob[(lesion > 0) & (lesion != sizes.argmax())] = 0.0
    return prob


# ----------------------------------------------------------------------------------------------
# One photo: the functions the bulk path below, evaluate.py and the web app share

TINT, OUTLINE = (255, 200, 0), (255, 0, 0)  # amber wash and a red border: visible on any skin tone
PREVIEW_SIDE = 1024  # px, long side of overlays and of what the web page shows
BAND_ROWS = 256  # rows of a native-size map worked out at a time (see native_prob)


def model_input(image, size):
    """The size x size squash the model sees (the one evaluate.py's scores are measured on)."""
    return data.resize_image(image, (size, size))


def native_prob(small_prob, size_hw, threshold=0.5):
    """(lesion_stats, bool mask at size_hw) from the model's size x size probability map, resized
    (bilinear) a band of rows at a time: the float32 map of a 50-megapixel photo (200 MB) is never
    whole. Each band is cut from the whole map's sampling grid, so the mask is one resize's but
    where rounding puts a probability within 1e-5 of the threshold on the other side."""
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
    return _stats(area, inside, h, w), mask


def lesion_stats(mask, prob):
    """{"area_px", "area_percent" (0-100), "mean_prob" (inside the mask; 0.0 if empty), "width",
    "height"} of one native-size mask and its probability map."""
    mask = np.asarray(mask, bool)
    inside = float(np.sum(prob, where=mask, dtype=np.float64))  # no copy of prob[mask]
    return _stats(int(np.count_nonzero(mask)), inside, *mask.shape)


def _stats(area, inside, h, w):
    return {"area_px": area, "area_percent": 100.0 * area / (h * w) if h * w else 0.0,
            "mean_prob": inside / area if area else 0.0, "width": int(w), "height": int(h)}


def preview_hw(hw, side=PREVIEW_SIDE):
    """(h, w) scaled down so the long side is at most `side` (never up)."""
    h, w = hw
    scale = min(1.0, side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def decode_preview(file, native, raw=None):
    """The photo as uint8 (h, w, 3) at preview_hw(native): a JPEG decodes in draft mode at the
    smallest scale that still covers it, so full-resolution pixels are never decoded."""
    hw = preview_hw(native)
    return data.resize_image(data.load_image(file, min_size=hw, raw=raw), hw)


def _erode(mask):
    # 4-neighbour erosion; pixels beyond the border count as background, so the frame is an edge.
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                         & mask[1:-1, :-2] & mask[1:-1, 2:])
    return inner


def overlay(image, mask, prob=None):
    """uint8 (H, W, 3): the photo with the lesion tinted (stronger where the model is surer, if
    prob is given) and its boundary drawn. Only mask pixels change, so the outline never hides the
    skin around the lesion that a reader compares it with."""
    image, mask = np.asarray(image, np.uint8), np.asarray(mask, bool)
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape} and mask {mask.shape} do not match")
    out = image.copy()
    if prob is None:
        alpha = np.full(mask.shape, 0.4, np.float32)
    else:
        alpha = np.clip(np.asarray(prob, np.float32), 0.0, 1.0) * 0.5
    a = alpha[mask][:, None]
    out[mask] = np.round(image[mask] * (1 - a) + np.asarray(TINT, np.float32) * a).astype(np.uint8)
    # About 3 px on a 1000 px photo: thick enough to see, thin enough not to hide the border.
    inner = mask
    for _ in range(max(1, round(max(mask.shape) / 350))):
        inner = _erode(inner)
    out[mask & ~inner] = OUTLINE
    return out


def png_bytes(image, **kw):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kw)
    return buffer.getvalue()


def save_mask_png(folder, image_id, pred):
    # ISIC submission format: 8-bit greyscale, 0/255, native size, <id>_segmentation.png.
    image = Image.fromarray(pred.astype(np.uint8) * 255, mode="L")
    payload = png_bytes(image, compress_level=1)
    common.atomic_write(os.path.join(folder, f"{image_id}_segmentation.png"),
                        lambda f: f.write(payload))


# ----------------------------------------------------------------------------------------------
# The pipeline: the model never waits for the disk


def pipeline(items, decode, finish, predict, batch, timing, problems, bar, workers=None):
    """While the model predicts batch i, one thread decodes batch i + 1 and a pool finishes
    (scores, writes) batch i - 1. decode(item) -> (decoded tuple whose last element is the model
    input, or a problem dict; seconds); predict(images) -> probabilities; finish(decoded, prob)
    runs in the pool. Yields (decoded, finish's result) in item order; problems and decode/predict
    time are recorded. At most three batches are in flight, so memory does not grow with the
    number of items."""
    chunks = (items[i:i + batch] for i in range(0, len(items), batch))
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(1) as decoder, ThreadPoolExecutor(workers) as pool:
        submit = lambda chunk: [decoder.submit(decode, item) for item in chunk or ()]
        decoding, finishing = submit(next(chunks, None)), []
        while decoding:
            decoded = []
            for job in decoding:
                result, seconds = job.result()
                timing["decode"] += seconds
                if isinstance(result, dict):
                    problems.append(result)
                    bar.update()
                else:
                    decoded.append(result)
            decoding = submit(next(chunks, None))
            if decoded:
                t = time.perf_counter()
                probs = predict(np.stack([d[-1] for d in decoded]))
                timing["predict"] += time.perf_counter() - t
                jobs = [(d, pool.submit(finish, d, prob)) for d, prob in zip(decoded, probs)]
                for d, job in finishing:  # batch i - 1 has been finishing while batch i predicted
                    yield d, job.result()
                finishing = jobs
        for d, job in finishing:
            yield d, job.result()


# ----------------------------------------------------------------------------------------------
# Photos in bulk

COLUMNS = ("image_id", "file", "width", "height", "area_px", "area_percent", "mean_prob")
OUTPUT_SUFFIXES = ("_segmentation", "_overlay")  # our own outputs, never photos to segment
HDF5_SUFFIXES = (".hdf5", ".h5")  # an ISIC 2024 archive; its photos are "archive.hdf5:<key>"


def find_photos(source):
    """[(image_id, file)] to segment: one photo, a plain folder of photos (not recursive, without
    our own outputs), a data folder in a known layout (every image, masks ignored) or an archive."""
    if os.path.isfile(source) and source.lower().endswith(HDF5_SUFFIXES):
        from extras import archive  # h5py, only for an archive
        return archive.find_photos(source)
    if os.path.isfile(source):
        return [(os.path.splitext(os.path.basename(source))[0], source)]
    if not os.path.isdir(source):
        raise common.Error(source, "no such file or folder")
    layout = data.layout_of(source)
    if layout:
        folders = [os.path.join(source, folder) for _, folder, _ in data.LAYOUTS[layout]]
        files = [p for folder in folders for p in data.image_files(folder)]
    else:
        files = [p for p in data.image_files(source)
                 if not _image_id(p).lower().endswith(OUTPUT_SUFFIXES)]
    if not files:
        raise common.Error(source, "no images found")
    return [(_image_id(p), p) for p in sorted(files)]


def _image_id(path):
    return os.path.splitext(os.path.basename(path))[0]


def _in_archive(file):
    return file.rpartition(":")[0].lower().endswith(HDF5_SUFFIXES)


def _decode_photo(reader, image_id, file, size):
    """(image_id, file, native (h, w), preview image, model input) or a problem dict, and seconds.
    One draft decode at the preview's size serves both the overlay and the model; the native size
    comes from the header."""
    t = time.perf_counter()
    try:
        raw = reader.raw(file) if reader and _in_archive(file) else None
        native = data.native_hw(file, raw)  # a bad file fails here, as one line naming it
        preview = decode_preview(file, native, raw)
    except common.Error as e:
        return {"file": e.file, "problem": e.problem}, time.perf_counter() - t
    except (OSError, KeyError) as e:
        problem = f"cannot read ({common.one_line(e)})"
        return {"file": file, "problem": problem}, time.perf_counter() - t
    return (image_id, file, native, preview, model_input(preview, size)), time.perf_counter() - t


def _write_prediction(folder, image_id, file, native, preview, small_prob, threshold, overlays):
    """Mask at native size, overlay preview and the CSV row of one photo; a thread runs it."""
    t = time.perf_counter()
    stats, mask = native_prob(small_prob, native, threshold)
    save_mask_png(folder, image_id, mask)
    if overlays:
        prob = data.resize_prob(small_prob, preview.shape[:2])  # a preview is small: whole
        tinted = Image.fromarray(overlay(preview, prob > threshold, prob))
        common.atomic_write(os.path.join(folder, f"{image_id}_overlay.jpg"),
                            lambda f: tinted.save(f, "JPEG", quality=90))
    return {"image_id": image_id, "file": file, **stats}, time.perf_counter() - t


def csv_line(row):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writerow({**row, "area_percent": f"{row['area_percent']:.4f}",
                     "mean_prob": f"{row['mean_prob']:.6f}"})
    return buffer.getvalue()


def predict_photos(predictor, photos, out, threshold=0.5, tta=False, post="none", overwrite=False,
                   overlays=True, progress=True, workers=None):
    """Segment photos without ground truth (find_photos' list) into `out`: each one's mask, overlay
    and a predictions.csv row, appended and flushed as it is done, in photo order. A photo with its
    mask and row from an earlier run is skipped unless overwrite. A bad file is a problem, skipped.
    Returns {"done", "skipped_existing", "problems", "seconds"}: counts, not rows, so memory stays
    flat over an archive."""
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "predictions.csv")
    finished = set()
    if overwrite or not os.path.exists(csv_path):
        common.atomic_write(csv_path, lambda f: f.write(",".join(COLUMNS).encode() + b"\n"))
    else:  # an earlier run's: keep what it finished
        from extras import archive
        finished = archive.finished(out, csv_path, COLUMNS)
    problems, seen, todo = [], {}, []
    for image_id, file in photos:
        if image_id in seen:  # a.jpg and a.png would write the same <id>_segmentation.png
            problem = f"duplicate id {image_id} (already {seen[image_id]}); skipped"
            problems.append({"file": file, "problem": problem})
            continue
        seen[image_id] = file
        if image_id not in finished:
            todo.append((image_id, file))
    reader = None
    if any(_in_archive(file) for _, file in todo):
        from extras import archive
        reader = archive.Reader()
    timing = dict.fromkeys(("decode", "predict", "write"), 0.0)
    bar = common.Progress(len(todo), "predict", progress)
    done, started = 0, time.perf_counter()
    try:
        with open(csv_path, "a", newline="") as rows:
            for _, (row, seconds) in pipeline(
                    todo, lambda item: _decode_photo(reader, *item, predictor.size),
                    lambda d, prob: _write_prediction(out, *d[:-1], prob, threshold, overlays),
                    lambda x: predict_probs(predictor, x, tta, post, threshold), predictor.batch,
                    timing, problems, bar, workers):
                rows.write(csv_line(row))  # one line, one write: a kill leaves whole rows behind
                rows.flush()
                timing["write"] += seconds
                done += 1
                bar.update()
    finally:
        if reader:
            reader.close()
    timing["total"] = time.perf_counter() - started
    return {"done": done, "skipped_existing": len(seen) - len(todo), "problems": problems,
            "seconds": {k: round(v, 3) for k, v in timing.items()}}


# ----------------------------------------------------------------------------------------------
# Command line


def model_parser(description):
    """The command line of running a model, which evaluate.py shares: --weights, the prediction
    path's settings (--threshold, --tta, --post, --size) and --no-progress. parse() checks them."""
    p = common.ArgumentParser(description=description)
    p.add_argument("--weights", required=True, help=".keras file, SavedModel folder or .tflite")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--tta", action="store_true", help="average identity, h-flip and v-flip")
    p.add_argument("--post", choices=POST, default="none",
                   help="fill holes and/or keep the largest lesion (docs/results.md measures them)")
    p.add_argument("--size", type=int, default=None, help="input size for a size-agnostic model")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse(parser, argv):
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise common.Error(f"--threshold {args.threshold}", "must be within [0, 1]")
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
    predictor = load_predictor(args.weights, args.size)
    print(f"model {args.weights} ({predictor.kind}, {predictor.size}px)   data {args.data} "
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
    overlays = ", <id>_overlay.jpg" if args.overlays else ""
    print(f"wrote {args.out}/: <id>_segmentation.png{overlays}, predictions.csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
