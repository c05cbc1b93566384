"""ONNX: the fourth model format, for ONNX Runtime on servers, phones (ONNX Runtime Mobile) and in
the browser (onnxruntime-web). export.py writes model.onnx beside the SavedModel and the .tflite
files (unless --no-onnx) and checks it here; predict.py, evaluate.py and app.py run a .onnx
--weights through extras/formats.py, behind the same Predictor as every other format.

The contract is the SavedModel's: input "image", float32 (N, S, S, 3) raw RGB 0..255 with a dynamic
batch axis; output "mask", float32 (N, S, S, 1) foreground probability. The model normalizes its
own input, so a caller feeds pixels as they are. Keras converts through tf2onnx (TensorFlow
backend); ONNX Runtime runs the file. docs/mobile.md has the usage and the figures.
"""
import importlib.util
import os
import time
import warnings

import numpy as np

import common

PINS = {"tf2onnx": "tf2onnx==1.17.0", "onnx": "onnx==1.23.2", "onnxruntime": "onnxruntime==1.32.0"}
ATOL = 1e-4  # max |probability difference| against the Keras model (float32 both sides)
THRESHOLD = 0.5


def require(what, modules, hint=""):
    """One line naming what to install when a package ONNX needs is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pins = " ".join(PINS[m] for m in missing)
        raise common.Error(what, f"ONNX needs {', '.join(missing)} (pip install {pins}){hint}")


def write_onnx(model, path):
    """model.onnx from a float32 Keras model, its output renamed "mask" (tf2onnx names it after
    the graph's last tensor) so every format answers to the same names."""
    import onnx

    with warnings.catch_warnings():  # Keras's tf2onnx shim probes np.object: NumPy 2 warns
        warnings.simplefilter("ignore", FutureWarning)
        model.export(path, format="onnx", verbose=False)
    graph_model = onnx.load(path)
    old = graph_model.graph.output[0].name
    for node in graph_model.graph.node:
        node.output[:] = ["mask" if name == old else name for name in node.output]
    graph_model.graph.output[0].name = "mask"
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, path)


def session(path, threads=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites, not faults
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def latency_ms(path, size, threads, runs=20, warmup=3):
    """Median wall time of one batch-1 run in ONNX Runtime with `threads` intra-op threads."""
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).astype(np.float32)
    times = []
    for i in range(warmup + runs):
        t = time.perf_counter()
        sess.run(None, {name: x})
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return round(1000 * float(np.median(times)), 2)


def onnx_step(model, size, work, keras_probs, val, threads, runs, calibration=None):
    """export.py's step: work/model.onnx and, given calibration images, model_int8.onnx, each
    checked against Keras on the val images and scored against their truth: report.json's "onnx"
    entry, {"float32": row, "int8": row}."""
    import evaluate
    import predict

    path = os.path.join(work, "model.onnx")
    try:
        write_onnx(model, path)
    except Exception as e:
        raise failed("model.onnx", f"conversion failed ({common.one_line(e)})") from None
    rows = {"float32": check_onnx(path, size, keras_probs, val.images, threads, runs)}
    if calibration is not None:
        rows["int8"] = check_int8(write_int8(path, calibration), size, keras_probs, val.images,
                                  threads, runs)
    for row in rows.values():
        predictor = predict.load_predictor(os.path.join(work, row["file"]))
        scores = evaluate.evaluate(predictor, val.pairs, progress=False)
        row["dice_vs_truth"] = float(scores["dice"])  # as export.py scores every file
    return rows


def write_int8(path, calibration):
    """model_int8.onnx beside `path`: ONNX Runtime's static quantization (QDQ, int8 weights per
    channel, uint8 activations) calibrated on the images export.py calibrates the .tflite on. Its
    input stays float32 0..255, the float file's contract."""
    from onnxruntime import quantization as q

    class Images(q.CalibrationDataReader):
        def __init__(self):
            self.images = iter(np.asarray(calibration, np.float32)[:, None])

        def get_next(self):
            image = next(self.images, None)
            return None if image is None else {"image": image}

    out = os.path.join(os.path.dirname(path), "model_int8.onnx")
    try:
        q.quantize_static(path, out, Images(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    except Exception as e:
        raise failed("model_int8.onnx", f"quantization failed ({common.one_line(e)})") from None
    return out


def check_int8(path, size, keras_probs, images, threads, runs, mean_atol=0.05):
    """The int8 file held to Keras as export.py holds the int8 .tflite: a mean |probability
    difference| within mean_atol (a broken calibration is ~0.3+), the masks' Dice reported."""
    import evaluate
    import predict

    name = os.path.basename(path)
    probs = predict.load_predictor(path).predict(images)
    diff = float(np.abs(probs - keras_probs).mean())
    if not diff <= mean_atol:
        raise failed(name, f"differs from the Keras model by {diff:.2g} on average")
    agree = evaluate.image_scores(keras_probs > THRESHOLD, probs > THRESHOLD)["dice"]
    return {"file": name, "size_mb": round(os.path.getsize(path) / 1e6, 3),
            "dice_vs_keras": float(np.mean(agree)), "mean_abs_diff_vs_keras": diff,
            "latency_ms": {str(t): latency_ms(path, size, t, runs) for t in threads}}


def failed(file, problem):
    """A check that failed: exit 1, as export.failed (this module does not import export.py,
    which may be the running script)."""
    return common.Error(file, problem, exit_code=1)


def check_onnx(path, size, keras_probs, images, threads=(2,), runs=20):
    """Run model.onnx on `images` (two batch sizes: the batch axis is dynamic) and hold it to the
    Keras model: max |diff| <= ATOL and the same masks. Returns report.json's "onnx" entry."""
    import evaluate
    import predict

    name = os.path.basename(path)
    predictor = predict.load_predictor(path)
    if predictor.size != size:
        raise failed(name, f"input is {predictor.size} px, expected {size}")
    probs = predictor.predict(images)  # batches of up to 8
    one = np.concatenate([predictor.predict(image[None]) for image in images[:2]])
    diff = float(max(np.abs(probs - keras_probs).max(), np.abs(one - keras_probs[:2]).max()))
    if not diff <= ATOL:
        raise failed(name, f"differs from the Keras model by {diff:.2g} (> {ATOL})")
    # A pixel within ATOL of the threshold may land either side in float32 arithmetic.
    decided = np.abs(keras_probs - THRESHOLD) > ATOL
    flipped = int(np.sum(((probs > THRESHOLD) != (keras_probs > THRESHOLD)) & decided))
    if flipped:
        raise failed(name, f"{flipped} mask pixels differ from the Keras masks")
    agree = evaluate.image_scores(keras_probs > THRESHOLD, probs > THRESHOLD)["dice"]
    return {"file": name, "size_mb": round(os.path.getsize(path) / 1e6, 3),
            "dice_vs_keras": float(np.mean(agree)),
            "input": {"name": "image", "shape": ["N", size, size, 3], "dtype": "float32"},
            "output": {"name": "mask", "shape": ["N", size, size, 1], "dtype": "float32"},
            "max_abs_diff_vs_keras": diff, "mask_pixels_differing": flipped,
            "latency_ms": {str(t): latency_ms(path, size, t, runs) for t in threads}}
