"""Score a lesion-segmentation model exactly as the ISIC 2018 Task 1 challenge does.

    python evaluate.py --weights best.keras [--data DIR] [--split val|test|all] [--out eval/]
                       [--save-masks DIR] [--threshold 0.5] [--tta]

Per image: squash-resize the image to the model's input size, predict a probability map, resize
that map back to the ground-truth mask's native resolution (bilinear), threshold it, and score it
against the native mask with the challenge's per-image metrics. The summary is the mean over images
(the challenge's "macro average"), plus pooled (all pixels together) Dice/IoU, medians and the worst
images. Any model file works through one code path: .keras, a SavedModel folder, or a .tflite.

Images without a ground-truth mask (a folder of plain photos, one photo, or the unmatched images of
an ISIC folder) are segmented instead of scored when --save-masks is given: a native-size mask, a
tinted overlay and a row of predictions.csv each.

    python evaluate.py --weights best.keras --data photos/ --save-masks out/
"""

import csv
import heapq
import io
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import data

METRICS = ("dice", "jaccard", "threshold_jaccard", "sensitivity", "specificity", "accuracy")
JACCARD_CUTOFF = 0.65  # the challenge's "thresholded Jaccard": below this an image scores 0
GRID_ROWS = 6          # images per comparison grid (best / worst / random)
TILE = 256             # px per grid tile: large enough to see a lesion border


# ----------------------------------------------------------------------------------------------
# Metrics: pure NumPy, vectorized, from confusion counts


def confusion(truth, pred):
    """(tp, fp, fn, tn) pixel counts of two boolean masks, (H, W) -> ints or (N, H, W) -> arrays.

    Any encoding works (bool, 0/1, 0/255): nonzero is foreground. Binarize the files first with
    data.load_mask (or > 128, the challenge's rule) before they get here."""
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} != prediction shape {pred.shape}")
    if truth.ndim not in (2, 3):
        raise ValueError(f"masks must be (H, W) or (N, H, W), got shape {truth.shape}")
    truth = truth if truth.dtype == bool else truth != 0
    pred = pred if pred.dtype == bool else pred != 0
    if truth.ndim == 2:
        # Three counts over one AND: the cheapest pass over a 12-megapixel mask.
        tp = np.count_nonzero(truth & pred)
        positives, predicted = np.count_nonzero(truth), np.count_nonzero(pred)
        total = truth.size
    else:
        flat_t, flat_p = truth.reshape(len(truth), -1), pred.reshape(len(pred), -1)
        tp = np.count_nonzero(flat_t & flat_p, axis=1)
        positives, predicted = np.count_nonzero(flat_t, axis=1), np.count_nonzero(flat_p, axis=1)
        total = flat_t.shape[1]
    fp = predicted - tp
    fn = positives - tp
    tn = total - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(numerator, denominator):
    # The challenge scores an undefined ratio (zero denominator, e.g. both masks empty) as 1.0.
    numerator = np.asarray(numerator, np.float64)
    denominator = np.asarray(denominator, np.float64)
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, 1.0, numerator / safe)


def scores_from_confusion(tp, fp, fn, tn):
    """The six challenge metrics from counts; scalars in -> floats out, arrays in -> arrays out."""
    jaccard = _ratio(tp, tp + fp + fn)
    out = {
        "dice": _ratio(2 * np.asarray(tp), 2 * np.asarray(tp) + fp + fn),
        "jaccard": jaccard,
        "threshold_jaccard": np.where(jaccard >= JACCARD_CUTOFF, jaccard, 0.0),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(np.asarray(tp) + tn, np.asarray(tp) + tn + fp + fn),
    }
    if np.ndim(tp) == 0:
        return {k: float(v) for k, v in out.items()}
    return out


def image_scores(truth, pred):
    """Per-image challenge metrics of boolean masks (H, W) -> dict of floats, (N, H, W) -> arrays."""
    return scores_from_confusion(*confusion(truth, pred))


def summarize(rows, worst=5):
    """Aggregate per-image rows (dicts with METRICS and tp/fp/fn/tn) into the summary.

    The headline numbers are per-image means, the challenge's macro average. Pooled Dice/IoU sum
    the counts of all images first, so large images weigh more; medians show the typical image."""
    if not rows:
        raise data.Error("evaluate: no image could be scored")
    summary = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
    summary["median"] = {k: float(np.median([r[k] for r in rows])) for k in METRICS}
    tp, fp, fn, tn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn", "tn"))
    pooled = scores_from_confusion(tp, fp, fn, tn)
    summary["pooled"] = {"dice": pooled["dice"], "jaccard": pooled["jaccard"]}
    summary["images"] = len(rows)
    ranked = sorted(rows, key=lambda r: (r["dice"], r["image_id"]))
    summary["worst"] = [{"image_id": r["image_id"], "dice": r["dice"]} for r in ranked[:worst]]
    return summary


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
            raise ValueError(f"expected (N, {self.size}, {self.size}, 3) images, got {images.shape}")
        out = [self._run_batch(images[i:i + self.batch]) for i in range(0, len(images), self.batch)]
        probs = np.concatenate(out) if out else np.zeros((0, self.size, self.size), np.float32)
        return probs.reshape(len(images), self.size, self.size).astype(np.float32, copy=False)


def _square_size(shape, path, size, default_size=None):
    """The model's input size from its input shape (N, H, W, 3).

    An explicit `size` must match a fixed input; `size` or else `default_size` (run.json's
    training size) fills a dynamic one."""
    if len(shape) != 4 or shape[-1] not in (3, None):
        raise data.Error(f"{path}: model input shape {tuple(shape)} is not (N, H, W, 3)")
    h, w = shape[1], shape[2]
    if h is None or w is None or h < 0 or w < 0:
        size = size if size is not None else default_size
        if size is None:
            raise data.Error(f"{path}: model accepts any input size; pass --size PX "
                             "(or keep run.json beside it)")
        return int(size)
    if h != w:
        raise data.Error(f"{path}: model input is {h}x{w}, expected a square input")
    if size is not None and int(size) != h:
        raise data.Error(f"{path}: model input is {h}x{w}, --size {size} does not match")
    return int(h)


def _load_keras(path, size, default_size=None):
    keras = data.import_keras()

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # corrupt zip, not a model, unknown layer...
        raise data.Error(f"{path}: cannot load Keras model ({data.one_line(e)})") from None
    size = _square_size(model.input_shape, path, size, default_size)

    def run(x):
        y = model.predict_on_batch(x.astype(np.float32))
        if isinstance(y, dict):
            y = y["mask"] if "mask" in y else next(iter(y.values()))
        return np.asarray(y, np.float32)

    _check_output(run, size, path)
    return Predictor(path, "keras", size, run)


def _load_saved_model(path, size, default_size=None):
    data.import_keras()  # quietly, before TensorFlow's own import
    import tensorflow as tf  # only this branch needs TensorFlow

    try:
        loaded = tf.saved_model.load(path)
        fn = loaded.signatures["serving_default"]
    except Exception as e:
        raise data.Error(f"{path}: cannot load SavedModel ({data.one_line(e)})") from None
    specs = fn.structured_input_signature[1]
    if len(specs) != 1:
        raise data.Error(f"{path}: serving signature has {len(specs)} inputs, expected 1")
    (name, spec), = specs.items()
    size = _square_size(spec.shape.as_list(), path, size, default_size)

    def run(x):
        outputs = fn(**{name: tf.constant(x, dtype=spec.dtype)})
        y = outputs["mask"] if "mask" in outputs else next(iter(outputs.values()))
        return y.numpy().astype(np.float32)

    _check_output(run, size, path)
    batch = spec.shape.as_list()[0]  # a signature with a fixed batch (e.g. 1) gets exactly that
    return Predictor(path, "saved_model", size, run, batch=batch or 8)


def _load_tflite(path, size):
    from ai_edge_litert.interpreter import Interpreter

    try:
        interp = Interpreter(model_path=path, num_threads=os.cpu_count())
        interp.allocate_tensors()
    except Exception as e:
        raise data.Error(f"{path}: cannot load TFLite model ({data.one_line(e)})") from None
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    size = _square_size(list(inp["shape"]), path, size)
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]

    def quantize(x):
        # Integer inputs carry their own scale/zero point; a uint8 model with scale 1, zero point 0
        # gets the raw camera bytes unchanged, exactly what a phone feeds it.
        if np.issubdtype(inp["dtype"], np.integer):
            if in_scale == 0:
                return x.astype(inp["dtype"])
            info = np.iinfo(inp["dtype"])
            q = np.round(x.astype(np.float32) / in_scale + in_zero)
            return np.clip(q, info.min, info.max).astype(inp["dtype"])
        return x.astype(inp["dtype"])

    def run(x):
        # One image per invoke: the exported signature has a fixed batch of 1 (faster on phones).
        probs = []
        for image in x:
            interp.set_tensor(inp["index"], quantize(image[None]))
            interp.invoke()
            y = interp.get_tensor(out["index"])
            if np.issubdtype(y.dtype, np.integer) and out_scale != 0:
                y = (y.astype(np.float32) - out_zero) * out_scale
            probs.append(y.astype(np.float32).reshape(size, size))
        return np.stack(probs)

    _check_output(run, size, path)
    return Predictor(path, "tflite", size, run)


def _check_output(run, size, path):
    # One dry run so a model with the wrong output shape fails here with one line, not mid-way.
    try:
        y = np.asarray(run(np.zeros((1, size, size, 3), np.uint8)))
    except Exception as e:
        raise data.Error(f"{path}: model failed on a {size}x{size} input ({data.one_line(e)})") from None
    if y.size != size * size:
        raise data.Error(f"{path}: model output shape {y.shape} is not one {size}x{size} map")


def load_predictor(path, size=None, default_size=None):
    """A Predictor for a .keras file, a SavedModel folder or a .tflite file.

    `size` is only needed for a model that accepts any input size (it must match a fixed one);
    `default_size` is the fallback for such a model (train.py's size from run.json)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise data.Error(f"{path}: model file not found")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise data.Error(f"{path}: folder is not a SavedModel (no saved_model.pb)")
        return _load_saved_model(path, size, default_size)
    if path.endswith(".tflite"):
        return _load_tflite(path, size)
    if path.endswith(".keras"):
        return _load_keras(path, size, default_size)
    raise data.Error(f"{path}: unknown model format (expected .keras, .tflite or a SavedModel folder)")


POST = ("none", "fill", "largest", "fill+largest")


def predict_probs(predictor, images, tta=False, post="none", threshold=0.5):
    """Probabilities (N, S, S) at the model's size: with tta, the mean of identity, horizontal and
    vertical flips; then post-processed (see postprocess). Every path that predicts comes here."""
    probs = predictor.predict(images)
    if tta:
        probs = probs + predictor.predict(images[:, :, ::-1])[:, :, ::-1]
        probs = probs + predictor.predict(images[:, ::-1])[:, ::-1]
        probs = probs / 3.0
    return np.stack([postprocess(p, threshold, post) for p in probs]) if post != "none" else probs


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
        border = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
        prob[(background > 0) & ~np.isin(background, border)] = 1.0
    if "largest" in post:
        lesion = label(prob > threshold)
        if lesion.any():
            sizes = np.bincount(lesion.ravel())
            sizes[0] = 0
            prob[(lesion > 0) & (lesion != sizes.argmax())] = 0.0
    return prob


# ----------------------------------------------------------------------------------------------
# Segmenting one photo: the functions the batch path below and a web app share

TINT, OUTLINE = (255, 200, 0), (255, 0, 0)  # amber wash and a red border: visible on any skin tone


def model_input(image, size):
    """The size x size squash the model sees (the same squash the scores above are measured on)."""
    return data.resize_image(image, (size, size))


def native_prob(small_prob, size_hw, threshold=0.5):
    """(float32 probability, bool mask) at size_hw from the model's size x size map."""
    prob = data.resize_prob(small_prob, size_hw)
    return prob, prob > threshold


def segment(predictor, image, threshold=0.5, tta=False, post="none"):
    """(float32 prob (H, W), bool mask (H, W)) for one uint8 (H, W, 3) photo at its native size."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    small = predict_probs(predictor, model_input(image, predictor.size)[None], tta, post, threshold)[0]
    return native_prob(small, image.shape[:2], threshold)


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
    alpha = np.full(mask.shape, 0.4, np.float32) if prob is None else \
        np.clip(np.asarray(prob, np.float32), 0.0, 1.0) * 0.5
    a = alpha[mask][:, None]
    out[mask] = np.round(image[mask] * (1 - a) + np.asarray(TINT, np.float32) * a).astype(np.uint8)
    # About 3 px on a 1000 px photo: thick enough to see, thin enough not to hide the border.
    inner = mask
    for _ in range(max(1, round(max(mask.shape) / 350))):
        inner = _erode(inner)
    out[mask & ~inner] = OUTLINE
    return out


def lesion_stats(mask, prob):
    """{"area_px", "area_percent" (0-100), "mean_prob" (inside the mask; 0.0 if empty), "width",
    "height"} of one native-size mask and its probability map."""
    mask = np.asarray(mask, bool)
    area = int(np.count_nonzero(mask))
    # sum(where=) instead of prob[mask]: no 12-megapixel temporary copy.
    inside = float(np.sum(prob, where=mask, dtype=np.float64)) if area else 0.0
    h, w = mask.shape
    return {"area_px": area, "area_percent": 100.0 * area / mask.size if mask.size else 0.0,
            "mean_prob": inside / area if area else 0.0, "width": int(w), "height": int(h)}


# ----------------------------------------------------------------------------------------------
# Comparison grids: image | ground truth | prediction | overlay, one row per image

TP_COLOR, FP_COLOR, FN_COLOR = (0, 200, 0), (255, 0, 255), (0, 160, 255)  # green, magenta, azure


def _fit(array, mode, box=TILE):
    """Letterbox an array into a box x box tile, keeping the native aspect ratio."""
    image = Image.fromarray(array)
    h, w = image.height, image.width
    scale = box / max(h, w)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    tile = Image.new(mode, (box, box), (96, 96, 96))  # grey letterbox: the black mask background stays visible
    tile.paste(image.convert(mode), ((box - image.width) // 2, (box - image.height) // 2))
    return tile


def thumbnails(truth, pred):
    """Truth and prediction shrunk to grid-tile size (native aspect), a few kB per image."""
    h, w = truth.shape
    scale = TILE / max(h, w)
    hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    # Stride down a 12-megapixel mask first (a view, no copy): the area-preserving resize of the
    # small mask then costs a millisecond instead of a 12-megapixel pass.
    step = max(1, min(h // hw[0], w // hw[1]) // 2)
    return data.resize_mask(truth[::step, ::step], hw), data.resize_mask(pred[::step, ::step], hw)


def make_tiles(image, truth_small, pred_small):
    """The four tiles of one grid row: image | ground truth | prediction | overlay."""
    image = data.resize_image(image, truth_small.shape)  # squashed back to the native aspect
    overlay = (image * 0.55).astype(np.uint8)
    overlay[truth_small & pred_small] = TP_COLOR
    overlay[~truth_small & pred_small] = FP_COLOR
    overlay[truth_small & ~pred_small] = FN_COLOR
    return [_fit(image, "RGB"), _fit(truth_small.astype(np.uint8) * 255, "RGB"),
            _fit(pred_small.astype(np.uint8) * 255, "RGB"), _fit(overlay, "RGB")]


def _font(size=14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def draw_grid(title, entries):
    """entries: [(row dict, tiles)] -> one PNG-ready image with a caption above every row."""
    font, caption, header = _font(14), 22, 30
    width = 4 * TILE
    grid = Image.new("RGB", (width, header + len(entries) * (caption + TILE)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), f"{title}   columns: image | ground truth | prediction | overlay "
              "(green TP, magenta FP, blue FN)", fill=(0, 0, 0), font=font)
    for i, (row, tiles) in enumerate(entries):
        y = header + i * (caption + TILE)
        draw.text((6, y + 4), f"{row['image_id']}   Dice {row['dice']:.3f}   Jaccard "
                  f"{row['jaccard']:.3f}   {row['width']}x{row['height']}", fill=(0, 0, 0), font=font)
        for j, tile in enumerate(tiles):
            grid.paste(tile, (j * TILE, y + caption))
    return grid


class GridPicker:
    """Keeps tiles only for the images that can still end up in a grid: the best, the worst and
    a seeded reservoir sample, so memory stays flat however large the split."""

    def __init__(self, rows=GRID_ROWS, seed=0):
        self.rows, self.rng, self.seen = rows, random.Random(seed), 0
        self.best, self.worst, self.sample = [], [], []  # heaps of (key, order, row, tiles)

    def wants(self, dice):
        full = lambda heap: len(heap) >= self.rows
        self._slot = self.rng.randrange(self.seen + 1) if self.seen >= self.rows else self.seen
        self.seen += 1
        return (not full(self.best) or dice > self.best[0][0]
                or not full(self.worst) or -dice > self.worst[0][0] or self._slot < self.rows)

    def add(self, row, tiles):
        order = self.seen
        for heap, key in ((self.best, row["dice"]), (self.worst, -row["dice"])):
            item = (key, -order, row, tiles)
            if len(heap) < self.rows:
                heapq.heappush(heap, item)
            elif key > heap[0][0]:
                heapq.heapreplace(heap, item)
        if self._slot < self.rows:
            if self._slot < len(self.sample):
                self.sample[self._slot] = (row, tiles)
            else:
                self.sample.append((row, tiles))

    def grids(self):
        best = [(r, t) for _, _, r, t in sorted(self.best, key=lambda e: (-e[0], -e[1]))]
        worst = [(r, t) for _, _, r, t in sorted(self.worst, key=lambda e: (-e[0], -e[1]))]
        sample = sorted(self.sample, key=lambda e: e[0]["image_id"])
        return {"grid_best.png": ("Best images", best), "grid_worst.png": ("Worst images", worst),
                "grid_random.png": ("Random sample", sample)}


# ----------------------------------------------------------------------------------------------
# Atomic writes: a crash never leaves a half-written output behind


def _atomic_bytes(path, payload):
    data.atomic_write(path, lambda f: f.write(payload))


def _png_bytes(image, **kw):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kw)
    return buffer.getvalue()


def write_csv(path, rows):
    columns = ["image_id", *METRICS, "tp", "fp", "fn", "tn", "height", "width"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    _atomic_bytes(path, buffer.getvalue().encode())


def save_mask_png(folder, image_id, pred):
    # ISIC submission format: 8-bit greyscale, 0/255, native size, <id>_segmentation.png.
    image = Image.fromarray(pred.astype(np.uint8) * 255, mode="L")
    _atomic_bytes(os.path.join(folder, f"{image_id}_segmentation.png"),
                  _png_bytes(image, compress_level=1))


# ----------------------------------------------------------------------------------------------
# The evaluation loop


def _draft_ok(image_hw, mask_hw):
    # The image decodes with JPEG draft mode at 1/1, 1/2, 1/4 or 1/8 scale (sizes rounded up);
    # the mask is read in full. Any of those scales mapping the mask onto the image is a match.
    (h, w), (mh, mw) = image_hw, mask_hw
    return any(-(-mh // s) == h and -(-mw // s) == w for s in (1, 2, 4, 8))


def _decode(pair, size):
    """(pair, decoded (h, w), image squashed to size x size) or a problem dict."""
    t = time.perf_counter()
    try:
        # Draft mode: a 4288x2848 JPEG decodes at 1/8 scale straight to >= size x size.
        image = data.load_image(pair.image, min_size=(size, size))
    except data.Error as e:
        return {"file": pair.image, "problem": str(e)}, time.perf_counter() - t
    return (pair, image.shape[:2], data.resize_image(image, (size, size))), time.perf_counter() - t


def _score(pair, image_hw, prob, threshold, save_masks):
    """Resize one probability map to its mask's native size, threshold and score it there.

    Returns (row, thumbnails, seconds) or (problem, None, seconds). Pure per image, so a pool of
    threads can run it (Pillow and NumPy release the GIL)."""
    t = time.perf_counter()
    try:
        truth = data.load_mask(pair.mask)  # native resolution: the challenge scores there
    except data.Error as e:
        return {"file": pair.mask, "problem": str(e)}, None, (time.perf_counter() - t, 0.0)
    if not _draft_ok(image_hw, truth.shape):
        return ({"file": pair.mask, "problem": f"mask is {truth.shape[1]}x{truth.shape[0]}, its "
                 f"image {pair.image} is not; pair skipped"}, None, (time.perf_counter() - t, 0.0))
    pred = data.resize_prob(prob, truth.shape) > threshold
    counts = confusion(truth, pred)
    row = {"image_id": pair.id, **scores_from_confusion(*counts),
           **dict(zip(("tp", "fp", "fn", "tn"), map(int, counts))),
           "height": truth.shape[0], "width": truth.shape[1]}
    scored = time.perf_counter()
    thumbs = thumbnails(truth, pred)
    if save_masks:
        save_mask_png(save_masks, pair.id, pred)
    return row, thumbs, (scored - t, time.perf_counter() - scored)


def pipeline(items, decode, finish, predict, batch, timing, problems, bar, workers=None):
    """The model never waits for the disk: while it predicts batch i, one thread decodes batch i + 1
    and a pool finishes (scores, writes) batch i - 1. decode(item) -> (decoded tuple whose last
    element is the model input, or a problem dict; seconds); predict(images) -> probabilities;
    finish(decoded, prob) runs in the pool. Yields (decoded, finish's result) in item order;
    problems and decode/predict time are recorded."""
    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(1) as decoder, ThreadPoolExecutor(workers) as pool:
        submit = lambda chunk: [decoder.submit(decode, item) for item in chunk]
        decoding, finishing = (submit(chunks[0]) if chunks else []), []
        for i in range(len(chunks)):
            decoded = []
            for job in decoding:
                result, seconds = job.result()
                timing["decode"] += seconds
                if isinstance(result, dict):
                    problems.append(result)
                    bar.update()
                else:
                    decoded.append(result)
            decoding = submit(chunks[i + 1]) if i + 1 < len(chunks) else []
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


def evaluate(predictor, pairs, threshold=0.5, tta=False, out=None, save_masks=None,
             progress=True, problems=None, info=None, workers=None, post="none"):
    """Score `pairs` (data.Pair list) with `predictor`; returns the summary dict.

    Writes metrics.csv, summary.json and grid_*.png into `out` (if given) and the predicted masks
    into `save_masks` (if given). Unreadable pairs are reported and skipped, listed in
    summary["problems"] after the given `problems` (from data.find_pairs)."""
    size = predictor.size
    problems = list(problems or [])
    timing = dict.fromkeys(("decode", "predict", "score", "write"), 0.0)
    rows, picker = [], GridPicker()
    for folder in (out, save_masks):
        if folder:
            os.makedirs(folder, exist_ok=True)
    bar = data.Progress(len(pairs), "evaluate", progress)
    started = time.perf_counter()
    # In image order, so rows, problems and the grid sample are the same on every run.
    for (pair, hw, image), (result, thumbs, (score_s, write_s)) in pipeline(
            pairs, lambda pair: _decode(pair, size),
            lambda decoded, prob: _score(decoded[0], decoded[1], prob, threshold, save_masks),
            lambda x: predict_probs(predictor, x, tta, post, threshold), predictor.batch,
            timing, problems, bar, workers):
        timing["score"] += score_s
        timing["write"] += write_s
        if thumbs is None:
            problems.append(result)
        else:
            rows.append(result)
            if out and picker.wants(result["dice"]):
                picker.add(result, make_tiles(image, *thumbs))
        bar.update()

    summary = summarize(rows)
    summary.update(info or {})
    summary.update({"model": predictor.path, "model_format": predictor.kind, "size": size,
                    "threshold": threshold, "tta": tta, "post": post, "problems": problems})
    t = time.perf_counter()
    if out:
        write_csv(os.path.join(out, "metrics.csv"), rows)
        for name, (title, entries) in picker.grids().items():
            if entries:
                _atomic_bytes(os.path.join(out, name),
                              _png_bytes(draw_grid(title, entries), compress_level=1))
    timing["write"] += time.perf_counter() - t
    timing["total"] = time.perf_counter() - started
    summary["seconds"] = {k: round(v, 3) for k, v in timing.items()}
    if out:
        _atomic_bytes(os.path.join(out, "summary.json"),
                      (json.dumps(summary, indent=2) + "\n").encode())
    summary["rows"] = rows
    return summary


# ----------------------------------------------------------------------------------------------
# Masks for photos without ground truth

OVERLAY_SIDE = 1024  # overlays are previews: a 12-megapixel JPEG would cost more than the model
PREDICTION_COLUMNS = ("image_id", "file", "width", "height", "area_px", "area_percent", "mean_prob")
OUTPUT_SUFFIXES = ("_segmentation", "_overlay")  # our own outputs, never photos to segment


def photo_files(folder):
    """The photos in a plain folder (not recursive), sorted, without masks this command wrote."""
    return [p for p in data.image_files(folder)
            if not os.path.splitext(os.path.basename(p))[0].lower().endswith(OUTPUT_SUFFIXES)]


def _problem(path, error):
    # data.Error messages already start with the file; the report adds it back once.
    message = str(error)
    return {"file": path, "problem": message[len(path) + 2:] if message.startswith(f"{path}: ")
            else message}


def _preview_hw(hw, side=OVERLAY_SIDE):
    h, w = hw
    scale = min(1.0, side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _decode_photo(image_id, path, size):
    """(image_id, path, native (h, w), preview image, model input) or a problem dict, and seconds.

    One draft decode at the preview's size serves both the overlay and the model: the native
    size comes from the header, so the full-resolution pixels are never decoded."""
    t = time.perf_counter()
    try:
        data.open_image(path).close()  # a bad file fails here, as one line naming it
        native = data.native_hw(path)
        preview_hw = _preview_hw(native)
        preview = data.resize_image(data.load_image(path, min_size=preview_hw), preview_hw)
    except data.Error as e:
        return _problem(path, e), time.perf_counter() - t
    except OSError as e:
        return {"file": path, "problem": f"cannot read ({e.strerror or data.one_line(e)})"}, \
            time.perf_counter() - t
    return (image_id, path, native, preview, model_input(preview, size)), time.perf_counter() - t


def _write_prediction(folder, image_id, path, native, preview, small_prob, threshold):
    """Mask at native size, overlay preview and the CSV row of one photo; a thread runs it."""
    t = time.perf_counter()
    prob, mask = native_prob(small_prob, native, threshold)
    row = {"image_id": image_id, "file": path, **lesion_stats(mask, prob)}
    if preview.shape[:2] == native:
        preview_prob, preview_mask = prob, mask
    else:
        preview_prob, preview_mask = native_prob(small_prob, preview.shape[:2], threshold)
    tinted = Image.fromarray(overlay(preview, preview_mask, preview_prob))
    save_mask_png(folder, image_id, mask)
    data.atomic_write(os.path.join(folder, f"{image_id}_overlay.jpg"),
                      lambda f: tinted.save(f, "JPEG", quality=90))
    return row, time.perf_counter() - t


def write_predictions_csv(path, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, PREDICTION_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "area_percent": f"{row['area_percent']:.4f}",
                         "mean_prob": f"{row['mean_prob']:.6f}"})
    _atomic_bytes(path, buffer.getvalue().encode())


def predict_photos(predictor, paths, out, threshold=0.5, tta=False, progress=True, workers=None,
                   post="none"):
    """Segment photos that have no ground truth: for each, <id>_segmentation.png (native size,
    0/255), <id>_overlay.jpg (tinted, outlined, at most OVERLAY_SIDE px) into `out`, and one row
    per photo in out/predictions.csv. Returns {"rows", "problems", "seconds"}; a bad file is a
    problem, skipped, and the run goes on. Runs through pipeline(), as evaluate() does."""
    size = predictor.size
    os.makedirs(out, exist_ok=True)
    timing = dict.fromkeys(("decode", "predict", "write"), 0.0)
    rows, problems, ids = [], [], {}
    todo = []
    for path in paths:
        image_id = os.path.splitext(os.path.basename(path))[0]
        if image_id in ids:  # a.jpg and a.png would write the same <id>_segmentation.png
            problems.append({"file": path, "problem": f"duplicate id {image_id} (already "
                             f"{ids[image_id]}); skipped"})
        else:
            ids[image_id] = path
            todo.append((image_id, path))
    bar = data.Progress(len(todo), "predict", progress)
    started = time.perf_counter()
    for _, (row, seconds) in pipeline(
            todo, lambda item: _decode_photo(*item, size),
            lambda d, prob: _write_prediction(out, *d[:-1], prob, threshold),
            lambda x: predict_probs(predictor, x, tta, post, threshold), predictor.batch,
            timing, problems, bar, workers):
        timing["write"] += seconds
        rows.append(row)  # in photo order, so predictions.csv is the same on every run
        bar.update()
    if rows:
        write_predictions_csv(os.path.join(out, "predictions.csv"), rows)
    timing["total"] = time.perf_counter() - started
    return {"rows": rows, "problems": problems,
            "seconds": {k: round(v, 3) for k, v in timing.items()}}


# ----------------------------------------------------------------------------------------------
# Command line


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
                raise data.Error(f"{path}: unreadable run.json ({data.one_line(e)})") from None
            return {**run, "_path": path}
    return {}


def _training_data(run):
    """The folders a model was trained on, from run.json (one path, or a list for train.py with
    several --data); the built-in synthetic set otherwise."""
    folders = data.folders_of(run.get("data"))
    for folder in folders:
        if not os.path.isdir(folder):
            raise data.Error(f"{run['_path']}: the model was trained on {folder}, which "
                             "is gone; pass --data DIR")
    return folders or [data.synthetic_dir(cache=run.get("cache") or None)]  # as train.py without --data


def find_inputs(root, val_fraction=0.1, test_fraction=0.1):
    """(pairs, problems, layout, photos without masks). `root` may be an ISIC or images/ + masks/
    folder (its images without a mask become photos), a plain folder of photos, or one photo."""
    if os.path.isfile(root):
        return [], [], "one photo", [root]
    if not os.path.isdir(root):
        raise data.Error(f"{root}: no such folder")
    if data.layout_of(root) is None:
        photos = photo_files(root)
        if not photos:
            raise data.Error(f"{root}: no images found (and no ISIC 2016/2017/2018 folders or "
                             "images/ + masks/)")
        return [], [], "photos", photos
    pairs, problems, layout = data.find_pairs(root, val_fraction, test_fraction)
    photos = [p["file"] for p in problems if p["problem"].startswith(data.NO_MASK)]
    return pairs, [p for p in problems if not p["problem"].startswith(data.NO_MASK)], layout, photos


def print_table(summary, file=None):
    file = file or sys.stdout
    print(f"\n{'metric':<18}{'mean':>9}{'median':>9}", file=file)
    for k in METRICS:
        print(f"{k:<18}{summary[k]:>9.4f}{summary['median'][k]:>9.4f}", file=file)
    print(f"{'pooled dice':<18}{summary['pooled']['dice']:>9.4f}", file=file)
    print(f"{'pooled jaccard':<18}{summary['pooled']['jaccard']:>9.4f}", file=file)
    worst = ", ".join(f"{w['image_id']} {w['dice']:.3f}" for w in summary["worst"][:3])
    print(f"images {summary['images']}   worst: {worst}", file=file)
    s = summary["seconds"]
    print(f"time {s['total']:.2f}s wall; stages (decode and scoring overlap prediction): decode "
          f"{s['decode']:.2f}, predict {s['predict']:.2f}, resize-back+score {s['score']:.2f}, "
          f"write {s['write']:.2f}", file=file)


def print_problems(problems):
    for problem in problems:
        print(f"skipped: {problem['file']}: {problem['problem']}", file=sys.stderr)


def print_header(args, predictor, root, layout, what, problems):
    print(f"model {args.weights} ({predictor.kind}, {predictor.size}px)   data {root} ({layout}, {what})",
          file=sys.stderr)
    print_problems(problems)


def score_split(predictor, root, chosen, found, layout, args, run, fractions, out, progress, **info):
    """evaluate() of one folder's chosen pairs into `out`; the pairs it had to skip on stderr."""
    info = {**info, "data": os.path.abspath(root), "layout": layout, "split": args.split,
            "val_fraction": fractions[0], "test_fraction": fractions[1], "run_json": run.get("_path")}
    summary = evaluate(predictor, chosen, args.threshold, args.tta, out, args.save_masks,
                       progress=progress, problems=found, info=info, post=args.post)
    print_problems(summary["problems"][len(found):])
    return summary


def evaluate_sources(predictor, roots, args, run, val_fraction, test_fraction, progress):
    """A model trained on several --data folders: each folder's split, found by its own rules as in
    training, is scored alone into OUT/<name>/, then all images together into OUT/summary.json
    (one prediction per image: the together numbers are aggregated from the per-source rows)."""
    summaries, rows, problems = {}, [], []
    for name, root in zip(data.source_names(roots), roots):
        pairs, found, layout, photos = find_inputs(root, val_fraction, test_fraction)
        found += [{"file": p, "problem": "no mask; skipped"} for p in photos]
        chosen = [q for q in pairs if args.split == "all" or q.split == args.split]
        if not chosen:
            raise data.Error(f"{root}: no images in the {args.split} split "
                             f"({len(pairs)} pairs found, layout {layout})")
        print_header(args, predictor, root, layout, f"split {args.split}: {len(chosen)} images", found)
        summary = score_split(predictor, root, chosen, found, layout, args, run, (val_fraction, test_fraction),
                              os.path.join(args.out, name), progress, source=name, predicted=0)
        print(f"\n{name}: {root}")
        print_table(summary)
        summaries[name], rows, problems = summary, rows + summary["rows"], problems + summary["problems"]
    together = summarize(rows)
    together.update({"data": [os.path.abspath(r) for r in roots], "split": args.split,
                     "val_fraction": val_fraction, "test_fraction": test_fraction,
                     "run_json": run.get("_path"), "model": predictor.path,
                     "model_format": predictor.kind, "size": predictor.size,
                     "threshold": args.threshold, "tta": args.tta, "problems": problems,
                     "seconds": {k: round(sum(s["seconds"][k] for s in summaries.values()), 3)
                                 for k in ("decode", "predict", "score", "write", "total")},
                     "sources": {name: {k: s[k] for k in ("data", "layout", "images", *METRICS, "median",
                                                          "pooled", "worst")}
                                 for name, s in summaries.items()}})
    _atomic_bytes(os.path.join(args.out, "summary.json"), (json.dumps(together, indent=2) + "\n").encode())
    print(f"\nall {len(roots)} sources together")
    print_table(together)
    names = ", ".join(summaries)
    print(f"wrote {args.out}/: summary.json (all together, and per source), and per source "
          f"({names}) <name>/metrics.csv, summary.json, grid_best/worst/random.png", file=sys.stderr)
    return together


@data.command
def main(argv=None):
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help=".keras file, SavedModel folder or .tflite")
    p.add_argument("--data", default=None, help="dataset folder, folder of photos or one "
                   "photo (default: the training data named in run.json beside the weights, else "
                   "the built-in synthetic set)")
    p.add_argument("--split", default="val", choices=("val", "test", "all"))
    p.add_argument("--out", default="eval", help="folder for metrics.csv, summary.json, grids")
    p.add_argument("--save-masks", default=None, metavar="DIR",
                   help="write <id>_segmentation.png masks (ISIC submission format); "
                   "images without masks also get <id>_overlay.jpg and a predictions.csv row")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--tta", action="store_true", help="average identity, h-flip and v-flip")
    p.add_argument("--post", choices=POST, default="none",
                   help="fill holes and/or keep the largest lesion (docs/results.md measures them)")
    p.add_argument("--size", type=int, default=None, help="input size for a size-agnostic model")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--test-fraction", type=float, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise data.Error(f"--threshold {args.threshold}: must be within [0, 1]")
    if not os.path.exists(args.weights):
        raise data.Error(f"{args.weights}: model file not found")
    run = read_run_json(args.weights)
    # Same split fractions as training, so the val split never contains training images.
    val_fraction = args.val_fraction if args.val_fraction is not None else run.get("val_fraction", 0.1)
    test_fraction = args.test_fraction if args.test_fraction is not None else run.get("test_fraction", 0.1)
    roots = [args.data] if args.data else _training_data(run)
    predictor = load_predictor(args.weights, args.size, default_size=run.get("size"))
    progress = not args.no_progress and sys.stderr.isatty()
    if len(roots) > 1:
        evaluate_sources(predictor, roots, args, run, val_fraction, test_fraction, progress)
        return 0
    root = roots[0]
    pairs, problems, layout, photos = find_inputs(root, val_fraction, test_fraction)
    if photos and not args.save_masks:
        if not pairs:
            raise data.Error(f"{root}: {len(photos)} images and no masks; pass --save-masks DIR "
                             "to write a predicted mask for each")
        problems += [{"file": p, "problem": "no mask; pass --save-masks DIR to predict one"}
                     for p in photos]
        photos = []
    chosen = [q for q in pairs if args.split == "all" or q.split == args.split]
    if not chosen and not photos:
        raise data.Error(f"{root}: no images in the {args.split} split "
                         f"({len(pairs)} pairs found, layout {layout})")
    split = f"split {args.split}: {len(chosen)} images" if pairs else "no masks"
    lone = f", {len(photos)} without masks" if photos else ""
    print_header(args, predictor, root, layout, split + lone, problems)
    predicted = None
    if photos:
        predicted = predict_photos(predictor, photos, args.save_masks, args.threshold, args.tta,
                                   progress=progress, post=args.post)
        print_problems(predicted["problems"])
    if chosen:
        summary = score_split(predictor, root, chosen, problems, layout, args, run, (val_fraction, test_fraction),
                              args.out, progress, predicted=len(predicted["rows"]) if predicted else 0)
        print_table(summary)
        masks = f"; {len(summary['rows'])} masks in {args.save_masks}" if args.save_masks else ""
        print(f"wrote {args.out}/: metrics.csv, summary.json, grid_best/worst/random.png{masks}",
              file=sys.stderr)
    if predicted is None:
        return 0
    if not predicted["rows"] and not chosen:
        raise data.Error(f"{root}: no image could be segmented", exit_code=1)
    s = predicted["seconds"]
    scored = f"scored {summary['images']} images with masks; " if chosen else ""
    print(f"{scored}predicted {len(predicted['rows'])} without "
          f"({len(predicted['problems'])} skipped) in {s['total']:.2f}s (predict {s['predict']:.2f}, "
          f"decode {s['decode']:.2f}, resize-back+write {s['write']:.2f})")
    print(f"wrote {args.save_masks}/: <id>_segmentation.png, <id>_overlay.jpg, predictions.csv",
          file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
