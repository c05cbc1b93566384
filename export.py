"""Export a trained U-Net for servers and phones, and verify every file before it is published.

    python export.py --weights runs/x/best.keras --data data/isic        # -> export/
    python export.py --weights best.keras --quantize int8,float16 --qat 1

Writes into --out (default export/); each file's contract, and why it is so: docs/mobile.md.
    saved_model/            TensorFlow, "serving_default": image (N, S, S, 3) RGB 0..255 -> mask
    model_float32.tflite    LiteRT, batch 1 (a dynamic batch costs latency), float32 in and out
    model_int8.tflite       full-integer, calibrated on training images: uint8 camera bytes in
                            (scale 1, zero point 0: the model normalizes its own input), uint8 out
    model_float16.tflite    with --quantize float16: float16 weights, float32 input/output
    model_int8_qat.tflite   with --qat EPOCHS: quantization-aware fine-tuning (extras/qat.py)
    model.onnx              ONNX Runtime: the SavedModel's contract, any batch (--no-onnx: none)
    model_int8.onnx         its static int8 quantization, same contract (with int8 in --quantize)
    report.json             sizes, latency, Dice vs the Keras masks and vs the ground truth
    model.json              what predict.py needs beside any file above: the training size, data and
                            split, and the run's review threshold (one threshold for every format)
All is written into a temporary folder beside --out, renamed into place once every check passed.
Read top to bottom: the Keras model, SavedModel and TFLite, the checks on the written files, ONNX,
the whole export, the command line. Every written file is run back through inference.py, the path
predict.py and evaluate.py take.
"""
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

import common
import data
import evaluate  # the scorer (Dice against the truth)
import inference
import layouts
import metrics
from extras import formats  # the exported formats run in their own runtimes

QUANT_KINDS = ("int8", "float16")
SAVED_MODEL_ATOL = 1e-5    # SavedModel reload vs Keras, max abs difference
FLOAT32_ATOL = 1e-4        # float32 .tflite vs Keras (XNNPACK reorders sums)
FLOAT16_MEAN_ATOL = 1e-2   # float16 weights: mean abs probability difference
INT8_MEAN_ATOL = 0.05      # int8: mean abs probability difference (a broken calibration is ~0.3+)
ONNX_ATOL = 1e-4           # model.onnx vs Keras, max abs difference (float32 both sides)
THRESHOLD = 0.5


def failed(file, problem):
    """An export that fails one of its checks: a failure during the run, exit 1 (bad input: 2)."""
    return common.Error(file, problem, exit_code=1)


# --- loading and checking the Keras model ---------------------------------------------------------
def check_args(quantize, path):
    """Before TensorFlow is imported: a typo fails in a moment, with one line."""
    bad = [k for k in quantize if k not in QUANT_KINDS]
    if bad:
        raise common.Error(f"--quantize {','.join(bad)}",
                           f"unknown (choose from {', '.join(QUANT_KINDS)})")
    if not os.path.isfile(path):
        raise common.Error(path, "model file not found")
    if not path.endswith(".keras"):
        raise common.Error(path, "expected a .keras model file (train.py's best.keras)")


def load_model(path, run):
    """(float32 model, square input size, rebuilt from mixed precision?) of a checked U-Net."""
    model = inference.load_keras(path)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise common.Error(path, f"not a segmentation model ({len(model.inputs)} inputs, "
                           f"{len(model.outputs)} outputs; expected 1 image in, 1 mask out)")
    shape_in, shape_out = tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)
    if len(shape_in) != 4 or shape_in[-1] != 3:
        raise common.Error(path, f"not a segmentation model (input shape {shape_in}, "
                           "expected (N, S, S, 3))")
    if len(shape_out) != 4 or shape_out[-1] != 1 or shape_out[1:3] != shape_in[1:3]:
        raise common.Error(path, f"not a segmentation model (output shape {shape_out} for input "
                           f"{shape_in}, expected one (N, S, S, 1) probability map)")
    size = inference.square_size(shape_in, path, None, run.get("size"))
    if not is_mixed(model):
        return model, size, False
    from extras import precision  # only a GPU-trained (mixed-precision) model needs the rebuild
    return precision.float32_copy(model), size, True


def is_mixed(model):
    """Whether any layer, a nested model's too, has a mixed-precision dtype policy."""
    return any(str(getattr(layer.dtype_policy, "name", "")).startswith("mixed_")
               or (hasattr(layer, "layers") and is_mixed(layer)) for layer in model.layers)


# --- SavedModel and TFLite conversion -------------------------------------------------------------
def write_saved_model(model, size, path, batch=None):
    """SavedModel, serving_default: {"image": float32 (batch, S, S, 3) 0..255} -> {"mask"}."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(image):
        return {"mask": model(image, training=False)}

    archive.add_endpoint("serving_default", serve, input_signature=[
        tf.TensorSpec([batch, size, size, 3], tf.float32, name="image")])
    archive.write_out(path, verbose=False)


def convert(fixed_saved_model, kind, calibration=None):
    """TFLite bytes, kind float32 | float16 | int8 (calibrated), from a batch-1 SavedModel: it
    freezes the variables a live Keras 3 model keeps as READ_VARIABLE ops calibration can't run."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(fixed_saved_model,
                                                         signature_keys=["serving_default"])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # never Flex / TF Select
    if kind == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]  # int8 or fail

        def representative():
            for image in calibration:
                image = image[None].astype(np.float32)
                # Two pixels pin the input range to exactly 0..255 -> uint8 input scale 1, zero
                # point 0 (raw camera bytes) even when no calibration image has a 0 and a 255.
                image[0, 0, 0], image[0, 0, 1] = 0, 255
                yield {"image": image}

        converter.representative_dataset = representative
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    return converter.convert()


# --- checks on the written files ------------------------------------------------------------------
def tflite_info(path):
    """Interpreter, input/output details and the set of op names of a .tflite file."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=path, num_threads=1)
    interp.allocate_tensors()
    # LiteRT has no public call that lists a model's ops (the converter's Analyzer only prints).
    ops = sorted({op["op_name"] for op in interp._get_ops_details()})
    return interp, interp.get_input_details()[0], interp.get_output_details()[0], ops


def tensor_contract(detail):
    scale, zero = detail["quantization"]
    return {"name": detail["name"], "shape": [int(v) for v in detail["shape"]],
            "dtype": np.dtype(detail["dtype"]).name, "scale": float(scale), "zero_point": int(zero)}


def check_tflite(path, kind, size, keras_probs, images):
    """Run the file in LiteRT on `images`; check shape, dtypes, builtin ops, closeness to Keras."""
    name = os.path.basename(path)
    interp, inp, out, ops = tflite_info(path)
    float_tensors = sum(t["dtype"] == np.float32 for t in interp.get_tensor_details())
    flex = [op for op in ops if op.startswith("Flex") or op == "CUSTOM"]
    if flex:
        raise failed(name, f"needs non-builtin ops {flex} (TF Select / custom)")
    want_in = np.uint8 if kind.startswith("int8") else np.float32
    for what, detail, channels in (("input", inp, 3), ("output", out, 1)):
        if tuple(detail["shape"]) != (1, size, size, channels) or detail["dtype"] != want_in:
            raise failed(name, f"{what} is {detail['dtype'].__name__} {tuple(detail['shape'])}, "
                         f"expected {want_in.__name__} (1, {size}, {size}, {channels})")
    probs = inference.load_predictor(path).predict(images)  # as predict.py, evaluate.py run it
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise failed(name, f"output is not a probability map (range {probs.min()}..{probs.max()})")
    diff = np.abs(probs - keras_probs)
    if kind == "float32" and diff.max() > FLOAT32_ATOL:
        raise failed(name, f"differs from the Keras model by {diff.max():.2g} (> {FLOAT32_ATOL})")
    mean_atol = {"float16": FLOAT16_MEAN_ATOL, "int8": INT8_MEAN_ATOL}.get(kind)
    if mean_atol and diff.mean() > mean_atol:
        hint = " (bad calibration data?)" if kind == "int8" else ""
        raise failed(name, f"differs from the Keras model by {diff.mean():.2g} on average{hint}")
    return {**file_row(path),
            "input": tensor_contract(inp), "output": tensor_contract(out), "ops": ops,
            "float32_tensors": int(float_tensors),
            "max_abs_diff_vs_keras": float(diff.max()),
            "mean_abs_diff_vs_keras": float(diff.mean()),
            "dice_vs_keras": dice_vs_keras(keras_probs, probs)}


def file_row(path):
    """What every file's row in report.json starts with: its name and size."""
    return {"file": os.path.basename(path), "size_mb": round(os.path.getsize(path) / 1e6, 3)}


def dice_vs_keras(keras_probs, probs):
    """Mean Dice of a file's masks against the Keras model's, at the model's size."""
    return float(np.mean(metrics.image_scores(keras_probs > THRESHOLD, probs > THRESHOLD)["dice"]))


def latency_ms(step, runs=20, warmup=3):
    """Median wall time of step(), a model's one batch-1 run, after `warmup` untimed runs."""
    times = []
    for i in range(warmup + runs):
        t = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return round(1000 * float(np.median(times)), 2)


def tflite_ms(path, threads, runs=20):
    """One invoke of a .tflite file with LiteRT's default XNNPACK delegate, in ms (latency_ms)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=path, num_threads=threads)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    x = np.random.default_rng(0).integers(0, 256, inp["shape"]).astype(inp["dtype"])
    interp.set_tensor(inp["index"], x)
    return latency_ms(interp.invoke, runs)


def onnx_ms(path, size, threads, runs=20):
    """One batch-1 run of an .onnx file in ONNX Runtime with `threads` threads, in ms."""
    session = formats.onnx_session(path, threads)
    feed = {session.get_inputs()[0].name:
            np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).astype(np.float32)}
    return latency_ms(lambda: session.run(None, feed), runs)


# --- ONNX: the fourth format, for ONNX Runtime on servers, phones and in the browser --------------
# The contract is the SavedModel's: input "image", float32 (N, S, S, 3) raw RGB 0..255 with a
# dynamic batch axis; output "mask", float32 (N, S, S, 1). Keras converts through tf2onnx.
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


def write_onnx_int8(path, calibration):
    """model_int8.onnx beside `path`: ONNX Runtime's static quantization (QDQ, int8 weights per
    channel, uint8 activations) calibrated on the images the .tflite is calibrated on. Its input
    stays float32 0..255, the float file's contract."""
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


def check_onnx(path, size, keras_probs, images, threads=(2,), runs=20):
    """Run model.onnx on `images` (two batch sizes: the batch axis is dynamic) and hold it to the
    Keras model: max |diff| <= ONNX_ATOL and the same masks. Returns report.json's row."""
    name = os.path.basename(path)
    predictor = inference.load_predictor(path)
    if predictor.size != size:
        raise failed(name, f"input is {predictor.size} px, expected {size}")
    probs = predictor.predict(images)  # batches of up to 8
    one = np.concatenate([predictor.predict(image[None]) for image in images[:2]])
    diff = float(max(np.abs(probs - keras_probs).max(), np.abs(one - keras_probs[:2]).max()))
    if not diff <= ONNX_ATOL:
        raise failed(name, f"differs from the Keras model by {diff:.2g} (> {ONNX_ATOL})")
    # A pixel within ONNX_ATOL of the threshold may land either side in float32 arithmetic.
    decided = np.abs(keras_probs - THRESHOLD) > ONNX_ATOL
    flipped = int(np.sum(((probs > THRESHOLD) != (keras_probs > THRESHOLD)) & decided))
    if flipped:
        raise failed(name, f"{flipped} mask pixels differ from the Keras masks")
    return {**file_row(path),
            "dice_vs_keras": dice_vs_keras(keras_probs, probs),
            "input": {"name": "image", "shape": ["N", size, size, 3], "dtype": "float32"},
            "output": {"name": "mask", "shape": ["N", size, size, 1], "dtype": "float32"},
            "max_abs_diff_vs_keras": diff, "mask_pixels_differing": flipped,
            "latency_ms": {str(t): onnx_ms(path, size, t, runs) for t in threads}}


def check_onnx_int8(path, size, keras_probs, images, threads, runs):
    """The int8 file held to Keras as the int8 .tflite is: a mean |probability difference| within
    INT8_MEAN_ATOL, the masks' Dice reported."""
    name = os.path.basename(path)
    probs = inference.load_predictor(path).predict(images)
    diff = float(np.abs(probs - keras_probs).mean())
    if not diff <= INT8_MEAN_ATOL:
        raise failed(name, f"differs from the Keras model by {diff:.2g} on average")
    return {**file_row(path),
            "dice_vs_keras": dice_vs_keras(keras_probs, probs), "mean_abs_diff_vs_keras": diff,
            "latency_ms": {str(t): onnx_ms(path, size, t, runs) for t in threads}}


def onnx_step(model, size, work, keras_probs, val, threads, runs, calibration=None):
    """work/model.onnx and, given calibration images, model_int8.onnx, each checked against Keras
    on the val images and scored against their truth: report.json's "onnx" entry."""
    path = os.path.join(work, "model.onnx")
    try:
        write_onnx(model, path)
    except Exception as e:
        raise failed("model.onnx", f"conversion failed ({common.one_line(e)})") from None
    rows = {"float32": check_onnx(path, size, keras_probs, val.images, threads, runs)}
    if calibration is not None:
        rows["int8"] = check_onnx_int8(write_onnx_int8(path, calibration), size, keras_probs,
                                       val.images, threads, runs)
    for row in rows.values():
        predictor = inference.load_predictor(os.path.join(work, row["file"]))
        row["dice_vs_truth"] = dice_vs_truth(predictor, val.pairs)  # as every file is scored
    return rows


# --- the whole export -----------------------------------------------------------------------------
def export(weights, data_dir=None, out="export", quantize=("int8",), qat=0, threads=(1, 2),
           calibration=100, qat_images=None, bench_runs=20, progress=True, onnx=True):
    """Convert, verify, time; publish `out` only when every check passed. Returns the report."""
    check_args(quantize, weights)
    if onnx:
        formats.require("model.onnx", ["tf2onnx", "onnx", "onnxruntime"], ", or --no-onnx")
    started = time.perf_counter()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    run = inference.read_run_json(weights)
    model, size, rebuilt = load_model(weights, run)
    images = choose_images(run, data_dir, size, calibration)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        val = images["val"]
        keras_probs = model.predict(val.images.astype(np.float32), batch_size=8, verbose=0)[..., 0]
        log("export: SavedModel")
        sm_diff = saved_model_step(model, size, work, val.images, keras_probs)
        files = tflite_step(model, size, work, quantize, images["calibration"], log)
        qat_summary = None
        if qat:
            log(f"export: QAT int8, {qat} epoch(s)")
            from extras.qat import run_qat  # tf_keras and tfmot, in a child process
            qat_summary = run_qat(model, images["train"], size, qat, work, images=qat_images)
            files["int8_qat"] = os.path.join(work, "model_int8_qat.tflite")
        rows = {}
        for kind, path in files.items():
            log(f"export: checking {os.path.basename(path)}")
            # int8_qat was fine-tuned (different weights): sanity checks only, no closeness bound.
            row = check_tflite(path, kind, size, keras_probs, val.images)
            row["latency_ms"] = {str(t): tflite_ms(path, t, bench_runs) for t in threads}
            row["dice_vs_truth"] = dice_vs_truth(inference.load_predictor(path), val.pairs)
            rows[kind] = row
        if onnx:
            log("export: ONNX")
            int8 = images["calibration"] if "int8" in quantize else None
            onnx_rows = onnx_step(model, size, work, keras_probs, val, threads, bench_runs, int8)
        keras_predictor = inference.Predictor(
            weights, "keras", size, lambda x: model.predict_on_batch(x.astype(np.float32))[..., 0])
        report = {
            "weights": os.path.abspath(weights), "size": size,
            "data": images["data"] or "synthetic", "eval_split": images["eval_split"],
            "eval_images": len(val.images), "calibration_images": len(images["calibration"]),
            "rebuilt_float32_from_mixed_precision": rebuilt, "threshold": THRESHOLD,
            "keras": {"dice_vs_truth": dice_vs_truth(keras_predictor, val.pairs),
                      "params": int(model.count_params())},
            "saved_model": {"path": "saved_model", "signature": "serving_default", "input": "image",
                            "output": "mask", "max_abs_diff_vs_keras": sm_diff},
            "tflite": rows, "onnx": onnx_rows if onnx else None, "qat": qat_summary,
            "threads": list(threads), "versions": versions(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        with open(os.path.join(work, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        # What predict.py and evaluate.py need to know of every file here, wherever it is copied
        # with it (inference.read_run_json): the training size, data and split, review threshold.
        known = {"size": size, "exported_from": os.path.abspath(weights),
                 **{k: run[k] for k in ("data", "val_fraction", "test_fraction", "review_threshold")
                    if run.get(k) is not None}}
        with open(os.path.join(work, "model.json"), "w") as f:
            json.dump(known, f, indent=2)
        publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def choose_images(run, data_dir, size, calibration):
    """One look at the data: the training split (calibration: a fixed, evenly spaced subset of it;
    QAT) and the split Dice is measured on (val; test, then train, when a tiny set has none)."""
    data_dir = data_dir or run.get("data") or None  # one folder, or the list of a multi-source run
    roots = layouts.data_folders(data_dir)
    fractions = (float(run.get("val_fraction", 0.1)), float(run.get("test_fraction", 0.1)))
    pairs = [p for root in roots for p in layouts.find_pairs(root, *fractions)[0]]
    split = lambda name: data.load_arrays([p for p in pairs if p.split == name], size,
                                          progress=False)
    train = split("train")
    if not train.pairs:
        raise common.Error(", ".join(roots), "no usable training images for calibration")
    count = min(calibration, len(train.images))
    pick = np.linspace(0, len(train.images) - 1, count).round().astype(int)
    eval_split = next(s for s in ("val", "test", "train") if any(p.split == s for p in pairs))
    return {"data": data_dir, "train": train, "calibration": train.images[np.unique(pick)],
            "val": split(eval_split), "eval_split": eval_split}


def saved_model_step(model, size, work, images, keras_probs):
    """work/saved_model, reloaded and checked against Keras; returns the largest difference."""
    import tensorflow as tf

    saved = os.path.join(work, "saved_model")
    write_saved_model(model, size, saved)
    reloaded = tf.saved_model.load(saved).signatures["serving_default"]
    batches = [tf.constant(images[i:i + 8], tf.float32) for i in range(0, len(images), 8)]
    sm_probs = np.concatenate([reloaded(image=b)["mask"].numpy() for b in batches])[..., 0]
    sm_diff = float(np.abs(sm_probs - keras_probs).max())
    if sm_diff > SAVED_MODEL_ATOL:
        raise failed("saved_model", f"reloaded output differs from Keras by {sm_diff:.2g}")
    return sm_diff


def tflite_step(model, size, work, quantize, calibration, log):
    """{kind: path} of float32 and each asked-for quantization, from a batch-1 SavedModel."""
    fixed = os.path.join(work, ".batch1_saved_model")
    write_saved_model(model, size, fixed, batch=1)
    files = {}
    for kind in ("float32", *[k for k in QUANT_KINDS if k in quantize]):
        log(f"export: {kind} TFLite")
        path = os.path.join(work, f"model_{kind}.tflite")
        try:
            blob = convert(fixed, kind, calibration if kind == "int8" else None)
        except Exception as e:
            problem = f"conversion failed ({common.one_line(e)})"
            raise failed(f"model_{kind}.tflite", problem) from None
        with open(path, "wb") as f:
            f.write(blob)
        files[kind] = path
    shutil.rmtree(fixed)
    return files


def dice_vs_truth(predictor, pairs):
    """Mean Dice against the ground truth at native resolution: evaluate.py's scorer."""
    return float(evaluate.evaluate(predictor, pairs, progress=False)["dice"])


def versions():
    import keras
    import tensorflow as tf
    return {"tensorflow": tf.__version__, "keras": keras.__version__}


def publish(work, out):
    """Move the finished folder into place; an older export is removed only after the swap."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.replace(out, os.path.join(old, "previous"))
    os.chmod(work, 0o777 & ~common.UMASK)  # mkdtemp made it private; publish it like any folder
    os.replace(work, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def print_table(report, file=sys.stdout):
    threads = [str(t) for t in report["threads"]]
    head = f"{'file':<24}{'MB':>8}" + "".join(f"{f'ms@{t}thr':>10}" for t in threads)
    print(head + f"{'dice~keras':>12}{'dice~truth':>12}", file=file)
    print(f"{'keras (float32)':<24}{'':>8}" + "".join(f"{'':>10}" for _ in threads) +
          f"{1.0:>12.4f}{report['keras']['dice_vs_truth']:>12.4f}", file=file)
    for row in [*report["tflite"].values(), *(report["onnx"] or {}).values()]:
        print(f"{row['file']:<24}{row['size_mb']:>8.2f}" +
              "".join(f"{row['latency_ms'][t]:>10.1f}" for t in threads) +
              f"{row['dice_vs_keras']:>12.4f}{row['dice_vs_truth']:>12.4f}", file=file)
    sm_diff = report["saved_model"]["max_abs_diff_vs_keras"]
    print(f"{report['eval_split']} images: {report['eval_images']}, calibration images: "
          f"{report['calibration_images']}, SavedModel max |diff| {sm_diff:.1e}", file=file)


@common.command
def main(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="train.py's best.keras")
    p.add_argument("--data", help="data folder for calibration and Dice "
                   "(default: run.json's, else synthetic)")
    p.add_argument("--out", default="export",
                   help="output folder (replaced only when all checks pass)")
    p.add_argument("--quantize", default="int8",
                   help="comma list of int8, float16 (float32 always)")
    p.add_argument("--qat", type=int, default=0, metavar="EPOCHS",
                   help="quantization-aware fine-tuning epochs")
    p.add_argument("--qat-images", type=int, help="use at most N training images for QAT")
    p.add_argument("--calibration", type=int, default=100,
                   help="training images for int8 calibration")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="no model.onnx")
    p.add_argument("--threads", default="1,2", help="LiteRT and ONNX Runtime thread counts to time")
    p.add_argument("--bench-runs", type=int, default=20,
                   help="timed invokes per file and thread count")
    args = p.parse_args(argv)
    try:
        threads = tuple(int(t) for t in args.threads.split(","))
    except ValueError:
        problem = "expected a comma list of integers"
        raise common.Error(f"--threads {args.threads}", problem) from None
    quantize = tuple(k.strip() for k in args.quantize.split(",") if k.strip())
    report = export(args.weights, args.data, args.out, quantize, args.qat, threads,
                    args.calibration, args.qat_images, args.bench_runs, onnx=args.onnx)
    print_table(report)
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
