"""Masks for new photos, from a .keras model or an export (SavedModel, .tflite, .onnx).

    python predict.py --weights best.keras --data photos/ --out masks/

For each photo: <id>_segmentation.png (0/255 at native size, the ISIC submission format),
<id>_overlay.jpg (at most 1024 px) and a predictions.csv row, with the photo's uncertainty and
review flag (metrics.py). --data is a folder of photos, one photo, a data folder (masks ignored)
or an ISIC 2024 HDF5 archive (extras/archive.py). Read top to bottom: one photo (its mask at
native size, its overlay; shared with app.py), photos in bulk, the command line. The model runs
through inference.py, as everywhere. docs/evaluation.md has more.
"""
import csv
import functools
import os
import sys
import time

import numpy as np
from PIL import Image

import common
import imaging
import inference
import metrics

# --- One photo: the functions the bulk path below and the web app share --------------------------
PREVIEW_SIDE = 1024  # px, long side of overlays and of what the web page shows
BAND_ROWS = 256  # rows of a native-size map worked out at a time (see native_mask)


def decode_preview(file, native, raw=None):
    """The photo as uint8 (h, w, 3), its long side at most PREVIEW_SIDE (never enlarged): a JPEG
    decodes in draft mode at the smallest scale that still covers it, so full-resolution pixels
    are never decoded."""
    scale = min(1.0, PREVIEW_SIDE / max(native))
    hw = max(1, round(native[0] * scale)), max(1, round(native[1] * scale))
    return imaging.resize_image(imaging.read_image(file, min_size=hw, raw=raw)[0], hw)


def native_mask(small_prob, size_hw, threshold=0.5):
    """(bool mask at size_hw, its figures) from the model-size map, resized (bilinear) a band of
    rows at a time from the whole map's sampling grid: one resize's mask, but the float32 map of a
    50-megapixel photo (200 MB) is never whole. The figures: the lesion's area in pixels and in %
    of the photo, the mean probability inside it, the photo's width and height."""
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
    figures = {"area_px": area, "area_percent": 100.0 * area / (h * w) if h * w else 0.0,
               "mean_prob": inside / area if area else 0.0, "width": int(w), "height": int(h)}
    return mask, figures


# The overlay a person looks at: the photo with the lesion tinted and outlined, and, where the
# model is unsure, a sparse cyan hatch.
TINT, OUTLINE = (255, 200, 0), (255, 0, 0)  # amber wash and a red border: visible on any skin tone
HATCH = (0, 200, 255)  # cyan: far from the amber and the red, and from any skin tone
# The unsure band: a pixel the model gives at least one chance in four of either answer. A slider
# move of 0.25 from the default 0.5 flips it, so it is the part of the mask a reader should doubt.
UNSURE_LOW, UNSURE_HIGH = 0.25, 0.75
HATCH_EVERY = 8  # px between the hatch's 1-px diagonal lines: 1 pixel in 8 is drawn, the skin shows


def _erode(mask):
    # 4-neighbour erosion; pixels beyond the border count as background, so the frame is an edge.
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                         & mask[1:-1, :-2] & mask[1:-1, 2:])
    return inner


def unsure_band(prob):
    """bool (H, W): the pixels whose probability is within [UNSURE_LOW, UNSURE_HIGH]."""
    prob = np.asarray(prob, np.float32)
    return (prob >= UNSURE_LOW) & (prob <= UNSURE_HIGH)


@functools.lru_cache(maxsize=8)  # photos in bulk share a few preview sizes: made once per size
def hatch_pattern(shape):
    """bool (H, W), read-only: 1-px diagonal lines HATCH_EVERY px apart, from the image's corner."""
    h, w = shape
    pattern = (np.arange(h)[:, None] + np.arange(w)[None, :]) % HATCH_EVERY == 0
    pattern.flags.writeable = False
    return pattern


def draw_overlay(image, mask, prob=None, unsure=True):
    """uint8 (H, W, 3): the photo with the lesion tinted (stronger where the model is surer, if
    prob is given) and its boundary drawn. Without the hatch only mask pixels change, so the
    outline never hides the skin around the lesion that a reader compares it with. With prob and
    `unsure`, pixels in the unsure band (inside the mask or not) also get a sparse hatch: a wide
    band is where the mask's edge could as well be elsewhere. The outline goes on top of it."""
    image, mask = np.asarray(image, np.uint8), np.asarray(mask, bool)
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape} and mask {mask.shape} do not match")
    if prob is not None and np.shape(prob) != mask.shape:
        raise ValueError(f"prob {np.shape(prob)} and mask {mask.shape} do not match")
    out = image.copy()
    if prob is None:
        alpha = np.full(mask.shape, 0.4, np.float32)
    else:
        alpha = np.clip(np.asarray(prob, np.float32), 0.0, 1.0) * 0.5
    a = alpha[mask][:, None]
    out[mask] = np.round(image[mask] * (1 - a) + np.asarray(TINT, np.float32) * a).astype(np.uint8)
    if prob is not None and unsure:
        out[unsure_band(prob) & hatch_pattern(tuple(mask.shape))] = HATCH
    # About 3 px on a 1000 px photo: thick enough to see, thin enough not to hide the border.
    inner = mask
    for _ in range(max(1, round(max(mask.shape) / 350))):
        inner = _erode(inner)
    out[mask & ~inner] = OUTLINE
    return out


def write_overlay(folder, image_id, preview, small_prob, threshold):
    """<id>_overlay.jpg in folder: the model-size map resized whole (a preview is small)."""
    prob = imaging.resize_prob(small_prob, preview.shape[:2])
    tinted = Image.fromarray(draw_overlay(preview, prob > threshold, prob))
    common.atomic_write(os.path.join(folder, f"{image_id}_overlay.jpg"),
                        lambda f: tinted.save(f, "JPEG", quality=90))


# --- Photos in bulk -------------------------------------------------------------------------------
COLUMNS = ("image_id", "file", "width", "height", "area_px", "area_percent", "mean_prob",
           "uncertainty", "review")
DECIMALS = {"area_percent": ".4f", "mean_prob": ".6f", "uncertainty": ".6f"}  # in predictions.csv
OUTPUT_SUFFIXES = ("_segmentation", "_overlay")  # our own outputs, never photos to segment
HDF5_SUFFIXES = (".hdf5", ".h5")  # an ISIC 2024 archive; its photos are "archive.hdf5:<key>"
MASK_FILES = {False: "<id>_segmentation.png", True: "masks.hdf5"}  # photos, an archive's photos


def find_photos(source):
    """[(image_id, file)]: one photo, a folder of photos (not recursive, not our own outputs), a
    data folder (its image folders, masks ignored) or an archive."""
    if os.path.isfile(source) and source.lower().endswith(HDF5_SUFFIXES):
        from extras import archive  # h5py, only for an archive
        return archive.find_photos(source)
    image_id = lambda path: os.path.splitext(os.path.basename(path))[0]
    if os.path.isfile(source):
        return [(image_id(source), source)]
    if not os.path.isdir(source):
        raise common.Error(source, "no such file or folder")
    files = [p for p in imaging.image_files(source)
             if not image_id(p).lower().endswith(OUTPUT_SUFFIXES)]
    if not files:  # no photos at the top: a data folder keeps them in its layout's image folders
        import layouts

        layout = layouts.layout_of(source)
        folders = [os.path.join(source, f) for _, f, _ in layouts.LAYOUTS.get(layout, [])]
        files = [p for folder in folders for p in imaging.image_files(folder)]
    if not files:
        raise common.Error(source, "no images found")
    return [(image_id(p), p) for p in sorted(files)]


def _decode_photo(reader, image_id, file, size):
    """(image_id, file, native (h, w), preview, model input) or a problem dict, and seconds. One
    draft decode at the preview's size serves the overlay and the model; native size: the header."""
    t = time.perf_counter()
    try:
        raw = reader.raw(file) if reader else None  # an archive's photo: bytes from it
        native = imaging.native_hw(file, raw)  # a bad file fails here, as one line naming it
        preview = decode_preview(file, native, raw)
    except (common.Error, OSError, KeyError) as e:  # common.Error names the file and the problem
        why = e.problem if isinstance(e, common.Error) else f"cannot read ({common.one_line(e)})"
        return {"file": getattr(e, "file", file), "problem": why}, time.perf_counter() - t
    model_input = imaging.resize_image(preview, (size, size))  # the squash evaluate.py scores
    return (image_id, file, native, preview, model_input), time.perf_counter() - t


def _write_prediction(folder, image_id, file, native, preview, small_prob, threshold, overlays,
                      review_at, masks=None):
    """Mask at native size, overlay preview and the CSV row of one photo; a thread runs it. The
    mask: its own file, or for an archive's photo, PNG bytes in the row for `masks` to commit."""
    t = time.perf_counter()
    mask, figures = native_mask(small_prob, native, threshold)
    row = {"image_id": image_id, "file": file, **figures,
           "png": masks.encode(mask) if masks else imaging.save_mask_png(folder, image_id, mask),
           **metrics.flag(small_prob, threshold, review_at)}
    if overlays:
        write_overlay(folder, image_id, preview, small_prob, threshold)
    return row, time.perf_counter() - t


def predict_photos(predictor, photos, out, threshold=0.5, tta=False, post="none", overwrite=False,
                   overlays=None, progress=True, workers=None):
    """Segment find_photos' list into `out`: masks, overlays (None: not for an archive) and
    predictions.csv rows (appended in photo order). An archive's masks go into one file
    (extras/archive.py). Photos an earlier run finished are skipped unless overwrite; a bad file
    is a problem, skipped. Returns counts, not rows, so memory stays flat over an archive."""
    csv_path = os.path.join(out, "predictions.csv")
    archived = photos[0][1].rpartition(":")[0].lower().endswith(HDF5_SUFFIXES) if photos else False
    overlays, reader, masks = not archived if overlays is None else overlays, None, None
    if archived:  # one source: its photos' bytes, and one file for its masks
        from extras import archive
        reader, masks = archive.Reader(), archive.MaskArchive(out, csv_path, COLUMNS, overwrite)
    finished = set()
    if overwrite or not os.path.exists(csv_path):
        common.atomic_write(csv_path, lambda f: f.write(",".join(COLUMNS).encode() + b"\n"))
    else:  # an earlier run's: keep what it finished
        from extras import archive
        finished = archive.finished(out, csv_path, COLUMNS, masks)
    problems, seen = [], {}
    for image_id, file in photos:
        if image_id in seen:  # a.jpg and a.png would write the same <id>_segmentation.png
            problem = f"duplicate id {image_id} (already {seen[image_id]}); skipped"
            problems.append({"file": file, "problem": problem})
        seen.setdefault(image_id, file)
    todo = [(image_id, file) for image_id, file in seen.items() if image_id not in finished]
    timing = dict.fromkeys(("decode", "predict", "write"), 0.0)
    bar = common.Progress(len(todo), "predict", progress)
    done, flagged, started = 0, 0, time.perf_counter()
    decode = lambda item: _decode_photo(reader, *item, predictor.size)
    write = lambda d, prob: _write_prediction(out, *d[:-1], prob, threshold, overlays,
                                              predictor.review_threshold, masks)
    predict = lambda x: inference.predict_probs(predictor, x, tta, post, threshold)
    steps = inference.overlap  # an archive and a .tflite: whole photos in worker processes
    if archived and predictor.lanes > 1:
        settings = (_decode_photo, _write_prediction, out, threshold, overlays, tta, post)
        steps = functools.partial(archive.in_processes, predictor, settings)
    try:
        with open(csv_path, "a", newline="") as rows:
            writer = csv.DictWriter(rows, COLUMNS, extrasaction="ignore", lineterminator="\n")
            for _, (row, seconds) in steps(todo, decode, write, predict, predictor.batch, timing,
                                           problems, bar, workers, predictor.lanes):
                cells = {**row, **{k: format(row[k], f) for k, f in DECIMALS.items()}}
                if archived:  # a part's masks at a time, then its rows
                    masks.add(row["image_id"], row["png"], cells)
                else:  # one line, one write: a kill leaves whole rows behind
                    writer.writerow(cells)
                    rows.flush()
                timing["write"] += seconds
                done += 1
                flagged += row["review"]
                bar.update()
        if archived:
            masks.close()
    finally:
        if reader:
            reader.close()
    timing["total"] = time.perf_counter() - started
    outputs = [MASK_FILES[archived]] + ["<id>_overlay.jpg"] * overlays
    return {"done": done, "flagged": flagged, "skipped_existing": len(seen) - len(todo),
            "problems": problems, "seconds": {k: round(v, 3) for k, v in timing.items()},
            "outputs": [*outputs, "predictions.csv"]}


# --- Command line ---------------------------------------------------------------------------------
@common.command
def main(argv=None):
    p = inference.model_parser(__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a folder of photos, one photo, a data folder "
                   "(every image, masks ignored) or an ISIC 2024 HDF5 archive")
    p.add_argument("--out", required=True, help="folder for masks, overlays and predictions.csv")
    p.add_argument("--overwrite", action="store_true", help="redo photos an earlier run finished")
    p.add_argument("--overlay", dest="overlays", action="store_true", default=None,
                   help="also <id>_overlay.jpg (the default, except for an archive)")
    p.add_argument("--no-overlay", dest="overlays", action="store_false",
                   help="masks and rows only")
    args = inference.parse(p, argv)
    photos = find_photos(args.data)
    predictor = inference.load_predictor(args.weights, args.size, args.review_threshold)
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
          f"(predict {s['predict']:.2f}, decode {s['decode']:.2f}, masks+write {s['write']:.2f})")
    print(f"review: {result['flagged']} of {result['done']} photos flagged, uncertainty over "
          f"{predictor.review_threshold:.3f} ({predictor.review_source}); predictions.csv has "
          "each photo's uncertainty and review (1: flagged)")
    print(f"wrote {args.out}/: {', '.join(result['outputs'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
