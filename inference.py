"""Running a model, whatever its file: one Predictor over a .keras model and every export
(SavedModel, .tflite, .onnx), the one prediction path (test-time flips, post-processing), the review
threshold a model carries, and the loop that keeps the model busy while threads decode and write.

    predictor = load_predictor("best.keras")        # None: the released model, models/
    probs = predict_probs(predictor, images)        # uint8 (N, S, S, 3) -> float32 (N, S, S)

predict.py, evaluate.py, export.py and app.py all predict through here, so a model means the same
probabilities to each of them. No Keras at import: a .tflite never loads it.
"""
import itertools
import json
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import common
import metrics

RELEASED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "skin_unet.keras")


# --- Predictor: one interface over every format ---------------------------------------------------
class Predictor:
    """predict(uint8 (N, S, S, 3) raw RGB) -> float32 (N, S, S) foreground probability.
    review_threshold: the uncertainty over which a photo is flagged (None: never), and
    review_source, where it came from (load_predictor)."""

    def __init__(self, path, kind, size, run_batch, batch=8, review_threshold=None,
                 review_source=None):
        self.path, self.kind, self.size = path, kind, size
        self.batch = batch  # images per call: amortizes per-call overhead without much memory
        self.review_threshold, self.review_source = review_threshold, review_source
        self._run_batch = run_batch
        self.lanes = getattr(run_batch, "lanes", 1)  # calls that may run at once (overlap)

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


def keras_run(model):
    """run(uint8 batch) -> probabilities of a Keras model, for a Predictor."""
    def run(x):
        y = model.predict_on_batch(x.astype(np.float32))
        if isinstance(y, dict):
            y = y["mask"] if "mask" in y else next(iter(y.values()))
        return np.asarray(y, np.float32)
    return run


def open_model(path):
    """(kind, input shape, run, batch or None) of a model file: the one place a format is chosen."""
    if not os.path.exists(path):
        raise common.Error(path, "model file not found")
    if path.endswith(".keras"):
        model = load_keras(path)
        return "keras", model.input_shape, keras_run(model), None
    from extras import formats  # SavedModel, .tflite, .onnx: each in its own runtime

    return formats.open_exported(path)


def read_run_json(weights):
    """What is known of a model besides its weights (training size, data, split, review threshold):
    <stem>.json beside its file, else that of the model it was exported from, as export.py writes it
    (model_int8.tflite -> model.json; the released skin_unet_int8.tflite -> skin_unet.json, so the
    released pair flags by one threshold); then, outside models/, train.py's run.json beside the
    weights or one folder up (an export inside its run folder); else {}. The quick start's run.json
    above models/ is not the released model's."""
    path = os.path.abspath(weights)
    stem = os.path.splitext(path)[0]
    candidates = [stem + ".json", re.sub(r"_(int8|float16|float32)(_qat)?$", "", stem) + ".json"]
    if os.path.dirname(path) != os.path.dirname(RELEASED):
        here = path if os.path.isdir(path) else os.path.dirname(path)
        candidates += [os.path.join(folder, "run.json") for folder in (here, os.path.dirname(here))]
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
    """A Predictor for a .keras file or an export; None: the released model (models/README.md),
    after one dry run, so a wrong model fails here in one line. `size`: only for a model of any
    input size, which otherwise takes run.json's training size. The review threshold:
    `review_threshold` (--review-threshold), else the one stored with the model, else
    metrics.REVIEW_THRESHOLD (a model trained before train.py stored one)."""
    released = path is None or os.path.abspath(path) == RELEASED
    path = RELEASED if released else os.fspath(path)
    try:
        run = read_run_json(path)
        kind, shape, run_batch, batch = open_model(path)
        size = square_size(shape, path, size, run.get("size"))
        try:
            y = np.asarray(run_batch(np.zeros((1, size, size, 3), np.uint8)))
        except Exception as e:
            raise common.Error(path, f"model failed on a {size}x{size} input "
                                     f"({common.one_line(e)})") from None
        if y.size != size * size:
            raise common.Error(path, f"model output shape {y.shape} is not one {size}x{size} map")
    except common.Error as e:
        if not released:
            raise
        # The remedy first: a library's message behind it may be long (one_line cuts it).
        raise common.Error(e.file, "the released model cannot be used: restore it with "
                                   f"`git checkout models/` ({e.problem})") from None
    if review_threshold is not None:
        review = float(review_threshold), "--review-threshold"
    elif run.get("review_threshold") is not None:
        review = float(run["review_threshold"]), f"from {os.path.basename(run['_path'])}"
    else:
        review = metrics.REVIEW_THRESHOLD, "the default: the model stores none"
    return Predictor(path, kind, size, run_batch, batch or 8, *review)


# --- Predicting: the one path every prediction takes ---------------------------------------------
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
    from extras import postprocess  # --post: fill holes, keep the largest lesion

    return np.stack([postprocess.postprocess(p, threshold, post) for p in probs])


def overlap(items, decode, finish, predict, batch, timing, problems, bar, workers=None, lanes=1):
    """The model never waits for the disk: one thread decodes batches ahead, `lanes` threads run
    the model on one batch each (a .tflite: one interpreter per core, Predictor.lanes; else one
    thread), and a pool finishes (scores, writes) the batch before, at most lanes + 2 batches in
    flight. Pillow, LiteRT and PNG writes let go of the GIL, so the threads share the cores.
    decode(item) -> (a tuple ending in the model input, or a problem dict; seconds); finish(decoded,
    prob) runs in the pool. Yields (decoded, finish's result) in item order; problems and times are
    recorded (`python bench/bench_evaluate.py --photos` measures it against the model alone)."""
    chunks = (items[i:i + batch] for i in range(0, len(items), batch))

    def model_step(jobs):  # on a model thread: its batch's photos as they decode, then the model
        results = [job.result() for job in jobs]
        decoded = [r for r, _ in results if not isinstance(r, dict)]
        t = time.perf_counter()
        probs = predict(np.stack([d[-1] for d in decoded])) if decoded else []
        return results, decoded, probs, time.perf_counter() - t

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(1) as decoder, ThreadPoolExecutor(lanes) as model, \
            ThreadPoolExecutor(workers) as pool:
        submit = lambda chunk: model.submit(model_step, [decoder.submit(decode, i) for i in chunk])
        stepping, finishing = deque(submit(c) for c in itertools.islice(chunks, lanes + 1)), []
        while stepping:
            results, decoded, probs, seconds = stepping.popleft().result()
            stepping.extend(submit(c) for c in itertools.islice(chunks, 1))
            timing["predict"] += seconds
            for result, seconds in results:
                timing["decode"] += seconds
                if isinstance(result, dict):
                    problems.append(result)
                    bar.update()
            jobs = [(d, pool.submit(finish, d, prob)) for d, prob in zip(decoded, probs)]
            for d, job in finishing:  # the batch before has been finishing while this one ran
                yield d, job.result()
            finishing = jobs
        for d, job in finishing:
            yield d, job.result()


# --- The flags of running a model (predict.py, evaluate.py, app.py) -------------------------------
def model_parser(description):
    """The flags of running a model; parse() checks them."""
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
                   f"the model, else {metrics.REVIEW_THRESHOLD})")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse(parser, argv):
    args = parser.parse_args(argv)
    for flag in ("threshold", "review_threshold"):
        value = getattr(args, flag)
        if value is not None and not 0.0 <= value <= 1.0:
            raise common.Error(f"--{flag.replace('_', '-')} {value}", "must be within [0, 1]")
    return args
