"""Running the exported formats: a TensorFlow SavedModel folder, a LiteRT (.tflite) file and an
ONNX (.onnx) file, each in its own runtime.

An input asks for it: inference.open_model names this module, at one line, for any model file that
is not a .keras (a --weights naming an export; export.py's checks of the files it writes, and
export.py's ONNX timing, which imports it at its top). Each opener returns the model's input
shape and run(uint8 (N, S, S, 3)) -> float32 probabilities; inference.py checks the shape and wraps
run in its Predictor, the same for every format.
"""
import importlib.util
import os

import numpy as np

import common

TFLITE_BATCH = 16  # images per run() call: one lane's batch
# ONNX's packages are optional: a missing one is one line saying what to install.
PINS = {"tf2onnx": "tf2onnx==1.17.0", "onnx": "onnx==1.23.2", "onnxruntime": "onnxruntime==1.32.0"}


def open_exported(path):
    """(kind, input shape, run, batch or None) of a SavedModel folder, a .tflite or an .onnx file;
    anything else is one line naming the formats."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise common.Error(path, "folder is not a SavedModel (no saved_model.pb)")
        return ("saved_model", *open_saved_model(path))
    if path.endswith(".tflite"):
        return ("tflite", *open_tflite(path), TFLITE_BATCH)
    if path.endswith(".onnx"):
        return ("onnx", *open_onnx(path), None)
    raise common.Error(path, "unknown model format (expected .keras, .tflite, .onnx or a "
                             "SavedModel folder)")


def open_saved_model(path):
    """(input shape, run, batch) of a SavedModel's serving signature; batch is None unless the
    signature fixes it (an export for phones fixes 1)."""
    common.import_keras()  # quietly, before TensorFlow's own import
    import tensorflow as tf

    try:
        fn = tf.saved_model.load(path).signatures["serving_default"]
    except Exception as e:
        raise common.Error(path, f"cannot load SavedModel ({common.one_line(e)})") from None
    specs = fn.structured_input_signature[1]
    if len(specs) != 1:
        raise common.Error(path, f"serving signature has {len(specs)} inputs, expected 1")
    (name, spec), = specs.items()

    def run(x):
        outputs = fn(**{name: tf.constant(x, dtype=spec.dtype)})
        y = outputs["mask"] if "mask" in outputs else next(iter(outputs.values()))
        return y.numpy().astype(np.float32)

    shape = spec.shape.as_list()
    return shape, run, shape[0]


def open_tflite(path, lanes=None):
    """(input shape, run) of a .tflite file, float or integer-quantized. `lanes` (default: one per
    core) single-thread interpreters; run(x) takes a free one for the whole batch, so up to `lanes`
    calls run at once from as many threads (run.lanes says how many; LiteRT lets go of the GIL
    while it runs; inference.overlap uses it). On two cores, two lanes run the int8 U-Net faster
    than one two-thread interpreter, whose two threads wait for each other at every layer, where
    two lanes never wait for each other (docs/benchmarks.md)."""
    import queue

    from ai_edge_litert.interpreter import Interpreter

    lanes = max(1, lanes or os.cpu_count() or 1)
    try:
        interps = [Interpreter(model_path=path, num_threads=1) for _ in range(lanes)]
        for interp in interps:
            interp.allocate_tensors()
    except Exception as e:
        raise common.Error(path, f"cannot load TFLite model ({common.one_line(e)})") from None
    inp, out = interps[0].get_input_details()[0], interps[0].get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    free = queue.SimpleQueue()
    for interp in interps:
        free.put(interp)

    def quantize(x):
        # Integer inputs carry their own scale/zero point; a uint8 model with scale 1, zero point 0
        # gets the raw camera bytes unchanged, exactly what a phone feeds it (and no copy).
        if x.dtype == inp["dtype"] and (in_scale, in_zero) in ((1.0, 0), (0.0, 0)):
            return x
        if np.issubdtype(inp["dtype"], np.integer) and in_scale != 0:
            info = np.iinfo(inp["dtype"])
            q = np.round(x.astype(np.float32) / in_scale + in_zero)
            return np.clip(q, info.min, info.max).astype(inp["dtype"])
        return x.astype(inp["dtype"])

    def run_lane(interp, x):
        # The exported signature has a batch of 1 (what a phone runs). n photos in one invoke give
        # the same numbers (tested) about 9% faster per photo here, so the input takes the batch's
        # size, resized only when that changes.
        if interp.get_input_details()[0]["shape"][0] != len(x):
            interp.resize_tensor_input(inp["index"], [len(x), *inp["shape"][1:]])
            interp.allocate_tensors()
        interp.set_tensor(inp["index"], quantize(x))
        interp.invoke()
        y = interp.get_tensor(out["index"])
        if np.issubdtype(y.dtype, np.integer) and out_scale != 0:
            y = (y.astype(np.float32) - out_zero) * out_scale
        return y.astype(np.float32).reshape(x.shape[:3])

    def run(x):
        interp = free.get()
        try:
            return run_lane(interp, x)
        finally:
            free.put(interp)

    run.lanes = lanes
    return list(inp["shape"]), run


def require(what, modules, hint=""):
    """One line naming what to install when a package ONNX needs is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pins = " ".join(PINS[m] for m in missing)
        raise common.Error(what, f"ONNX needs {', '.join(missing)} (pip install {pins}){hint}")


def onnx_session(path, threads=None):
    """An ONNX Runtime session on the CPU, errors only in its log."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites, not faults
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def open_onnx(path):
    """(input shape, run) of an .onnx file in ONNX Runtime (the contract, docs/mobile.md: float32
    raw RGB 0..255 in, the probability out, any batch)."""
    require(path, ["onnxruntime"])
    try:
        session = onnx_session(path)
    except Exception as e:  # not a protobuf, not a model, an op it does not know...
        raise common.Error(path, f"cannot load ONNX model ({common.one_line(e)})") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        kinds = [i.type for i in inputs]
        raise common.Error(path, f"ONNX inputs are {kinds}, expected one float32 image")
    name = inputs[0].name

    def run(x):
        return np.asarray(session.run(None, {name: x.astype(np.float32)})[0], np.float32)

    return [d if isinstance(d, int) else None for d in inputs[0].shape], run
