"""Photo archives for predict.py: the ISIC 2024 (SLICE-3D) HDF5 file, and resuming a long run.

    python predict.py --weights models/skin_unet_int8.tflite --data train-image.hdf5 --out out/

An --data ending in .hdf5 or .h5 brings in find_photos and Reader: the archive holds one dataset of
JPEG bytes per isic_id, and each photo is named "<archive>:<isic_id>" in predictions.csv and in
error lines. With a .tflite on several cores, whole photos run in worker processes (in_processes).
Its masks go into one file, not 400,000 (MaskArchive): out/masks.hdf5, laid out as
the photos' archive, one dataset of PNG bytes per isic_id. A rerun into an --out that already holds
a predictions.csv (without --overwrite) brings in finished: it keeps the rows an earlier run
finished, so that run's photos are skipped. h5py comes with TensorFlow; only an archive imports it.
"""
import csv
import io
import itertools
import multiprocessing
import os
import shutil
import signal
import time
from collections import deque

import numpy as np

import common
import imaging

MASKS, PARTS = "masks.hdf5", "masks.parts"
PART_PHOTOS = 2000  # masks per part: what a kill can cost, a few seconds of work


def find_photos(source):
    """[(isic_id, "<source>:<isic_id>")] for every dataset in the archive, sorted."""
    import h5py

    try:
        with h5py.File(source, "r") as f:
            keys = sorted(k for k, v in f.items() if isinstance(v, h5py.Dataset))
    except OSError as e:
        raise common.Error(source, f"not a readable HDF5 file ({common.one_line(e)})") from None
    if not keys:
        raise common.Error(source, "no datasets (expected one dataset of image bytes per id)")
    return [(key, f"{source}:{key}") for key in keys]


class Reader:
    """The encoded bytes of "<archive>:<key>" photos, for the pipeline's one decoder thread: each
    archive is opened once and read from that thread only."""

    def __init__(self):
        self.archives = {}

    def raw(self, file):
        import h5py

        archive, _, key = file.rpartition(":")
        if archive not in self.archives:
            self.archives[archive] = h5py.File(archive, "r")
        f = self.archives[archive]
        try:  # h5py's low-level read: a third of the high-level one's time, per photo
            dataset = h5py.h5d.open(f.id, key.encode())
            if dataset.dtype.kind in "VuS" and dataset.shape is not None:  # bytes, as stored
                value = np.empty(dataset.shape, dataset.dtype)
                dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, value)
                return value.tobytes()
        except KeyError:
            pass  # not a dataset's name: the lookup below says so
        value = f[key][()]
        if isinstance(value, bytes):
            return value
        if isinstance(value, (np.ndarray, np.generic)):  # uint8 arrays, opaque (np.void) scalars
            return value.tobytes()
        raise common.Error(file, "the dataset holds no image bytes")  # h5py.Empty, say

    def close(self):
        for f in self.archives.values():
            f.close()


def finished(out, csv_path, columns, masks=None):
    """The ids an earlier run finished (mask written and row in predictions.csv), after dropping the
    rows it cannot vouch for: a last line cut short by a kill, and rows whose mask is gone (its
    <id>_segmentation.png in out, or for an archive's run, its mask in `masks`, a MaskArchive)."""
    try:
        with open(csv_path, newline="") as f:
            lines = f.readlines()
    except UnicodeDecodeError:  # (saved as UTF-16 by a spreadsheet, say): not ours, as below
        lines = []
    header = lines[0].rstrip("\n").split(",") if lines else []
    if header and header == list(columns)[:len(header)] and "uncertainty" in columns[len(header):]:
        raise common.Error(csv_path, "written by an older predict.py, without the uncertainty and "
                                     "review columns; --overwrite redoes its photos")
    if header != list(columns):
        raise common.Error(csv_path, "not a predictions.csv of this command; choose another "
                                     "--out, or --overwrite")
    has_mask = masks.ids().__contains__ if masks else \
        (lambda i: os.path.exists(os.path.join(out, f"{i}_segmentation.png")))
    kept, done = [lines[0]], set()
    for line in lines[1:]:
        image_id = next(csv.reader([line]), [""])[0]
        if line.endswith("\n") and has_mask(image_id):
            kept.append(line)
            done.add(image_id)
    if len(kept) < len(lines):
        common.atomic_write(csv_path, lambda f: f.write("".join(kept).encode()))
    return done


class MaskArchive:
    """An archive's masks in one HDF5 file, out/masks.hdf5: per isic_id one scalar of PNG bytes
    (imaging.mask_png: 0/255 at the photo's native size), the layout of the photos' own archive.

    Crash-safe as a folder of files is: masks are committed PART_PHOTOS at a time, each part a
    whole file (out/masks.parts/NNNNNN.hdf5, written to a temp file and renamed), and a part's
    predictions.csv rows are written only once it is; close() merges masks.hdf5 and the parts
    into a new masks.hdf5 (temp file, rename), then removes the parts. A kill loses at most the
    part in progress; a kill during the merge leaves the parts, merged again by the next run."""

    def __init__(self, out, csv_path, columns, overwrite=False):
        self.path, self.parts = os.path.join(out, MASKS), os.path.join(out, PARTS)
        self.csv_path, self.columns = csv_path, columns
        if overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
            if os.path.exists(self.path):
                os.remove(self.path)
        os.makedirs(self.parts, exist_ok=True)
        self.pending, self.rows = [], []

    def files(self):
        """masks.hdf5 (if there is one) and the committed parts, oldest first."""
        parts = sorted(os.path.join(self.parts, n) for n in os.listdir(self.parts)
                       if n.endswith(".hdf5") and not n.startswith(".tmp-"))
        return [self.path] * os.path.exists(self.path) + parts

    def ids(self):
        """Every id with a committed mask."""
        import h5py

        ids = set()
        for file in self.files():
            try:
                with h5py.File(file, "r") as f:
                    ids.update(f.keys())
            except OSError as e:
                raise common.Error(file, f"not a readable HDF5 file ({common.one_line(e)}); "
                                         "--overwrite redoes the archive") from None
        return ids

    @staticmethod
    def encode(mask):
        """The mask's PNG bytes."""
        buffer = io.BytesIO()
        imaging.mask_png(mask, buffer)
        return buffer.getvalue()

    def add(self, image_id, png, row):
        """One photo's mask (PNG bytes) and its predictions.csv row; every PART_PHOTOS, a commit."""
        self.pending.append((image_id, png))
        self.rows.append(row)
        if len(self.pending) >= PART_PHOTOS:
            self.commit()

    def commit(self):
        import h5py

        if not self.pending:
            return
        number = len(self.files()) + 1
        while os.path.exists(name := os.path.join(self.parts, f"{number:06d}.hdf5")):
            number += 1
        with common.atomic_path(name) as tmp, h5py.File(tmp, "w") as f:
            for image_id, png in self.pending:  # h5py's low-level calls: a third of the time
                value = np.void(png)
                dataset = h5py.h5d.create(f.id, image_id.encode(), h5py.h5t.py_create(value.dtype),
                                          h5py.h5s.create(h5py.h5s.SCALAR))
                dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.asarray(value))
        with open(self.csv_path, "a", newline="") as f:  # the rows after their masks
            csv.DictWriter(f, self.columns, extrasaction="ignore",
                           lineterminator="\n").writerows(self.rows)
        self.pending, self.rows = [], []

    def close(self):
        """Commit what is left, then merge the parts into masks.hdf5."""
        import h5py

        self.commit()
        files = self.files()
        if len(files) > os.path.exists(self.path):  # parts to merge (an id twice: kept once)
            with common.atomic_path(self.path) as tmp, h5py.File(tmp, "w") as merged:
                done = set()
                for file in files:
                    with h5py.File(file, "r") as f:
                        for image_id in (f.keys() - done):
                            h5py.h5o.copy(f.id, image_id.encode(), merged.id, image_id.encode())
                            done.add(image_id)
        shutil.rmtree(self.parts, ignore_errors=True)


# --- Whole photos in worker processes ----------------------------------------------------------
WORKER = {}  # in each worker process: its own Predictor (one LiteRT interpreter) and Reader


def in_processes(predictor, settings, items, decode, finish, predict, batch, timing, problems, bar,
                 workers=None, lanes=1):
    """inference.overlap's contract (yields (None, (row, seconds)) in item order; problems and
    times recorded) for an archive and a .tflite: each batch runs whole (read, decode, model, mask,
    PNG) in one of `lanes` worker processes, each with its own model and archive reader. Threads
    in one process share the GIL and wait for each other; processes do not (docs/benchmarks.md).
    settings: predict_photos' (its decode_photo and write_prediction functions, out, threshold,
    overlays, tta, post): each worker makes its decode, finish and predict from them, so the
    closures given are not used. At most 2 x lanes batches are in flight; a worker ignores Ctrl-C,
    which the main process handles."""
    chunks = (items[i:i + batch] for i in range(0, len(items), batch))
    start = (predictor.path, predictor.size, predictor.review_threshold, settings)
    with multiprocessing.get_context("spawn").Pool(lanes, _start_worker, start) as pool:
        submit = lambda chunk: pool.apply_async(_run_batch, (chunk,))
        pending = deque(submit(c) for c in itertools.islice(chunks, 2 * lanes))
        while pending:
            results, seconds = pending.popleft().get()
            pending.extend(submit(c) for c in itertools.islice(chunks, 1))
            for key, value in seconds.items():
                timing[key] += value
            for result in results:
                if isinstance(result, dict):  # a photo that could not be read
                    problems.append(result)
                    bar.update()
                else:
                    yield None, result


def _start_worker(path, size, review_threshold, settings):
    import inference

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    WORKER.update(predictor=inference.load_predictor(path, size, review_threshold),
                  reader=Reader(), settings=settings)


def _run_batch(chunk):
    """[a problem dict or (row, seconds) per photo], {"decode", "predict"} seconds."""
    import inference

    predictor, reader = WORKER["predictor"], WORKER["reader"]
    decode_photo, write_prediction, out, threshold, overlays, tta, post = WORKER["settings"]
    decoded = [decode_photo(reader, *item, predictor.size) for item in chunk]
    good = [d for d, _ in decoded if not isinstance(d, dict)]
    t = time.perf_counter()
    probs = inference.predict_probs(predictor, np.stack([d[-1] for d in good]), tta, post,
                                    threshold) if good else []
    seconds = {"decode": sum(s for _, s in decoded), "predict": time.perf_counter() - t}
    rows = iter(write_prediction(out, *d[:-1], prob, threshold, overlays,
                                 predictor.review_threshold, MaskArchive)
                for d, prob in zip(good, probs))
    return [d if isinstance(d, dict) else next(rows) for d, _ in decoded], seconds
