"""Quantization-aware training for export.py --qat EPOCHS: fine-tune the U-Net with fake
quantization, then convert it to a uint8-in, uint8-out .tflite (model_int8_qat.tflite).

tensorflow-model-optimization 0.8.1 only accepts tf_keras (Keras 2) models, and it needs
TF_USE_LEGACY_KERAS on before TensorFlow is imported. So the fine-tuning runs in a process of its
own, on a tf_keras copy of the graph rebuilt layer by layer from the Keras 3 config, with the
weights moved by name:

    run_qat(model, ...)             export.py's side: writes FOLDER, starts the child, reads back
    python -m extras.qat FOLDER     the child: graph.json + weights.npz + train.npz in FOLDER
                                    -> model_int8_qat.tflite + qat.json in FOLDER
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `-m extras.qat` resolves


# ----------------------------------------------------------------------------------------------
# export.py's side: the Keras 3 model in, the fine-tuned int8 file out


def run_qat(model, train, size, epochs, work, images=None, batch=8, lr=1e-5):
    """Fine-tune a tf_keras copy of `model` on at most `images` evenly spaced images of `train`
    (data.Arrays; all for None) in a child process; write work/model_int8_qat.tflite. Returns the
    child's summary (qat.json)."""
    cfg = model.get_config()
    nested = ("Functional", "Model", "Sequential")
    if any(layer.get("class_name") in nested for layer in cfg["layers"]):
        raise common.Error("--qat", "supports the plain U-Net only "
                           "(a pretrained encoder is a nested model)")
    keep = np.arange(len(train.images))
    if images and images < len(keep):
        keep = np.linspace(0, len(keep) - 1, images).round().astype(int)
    qdir = os.path.join(work, "qat")
    os.makedirs(qdir)
    with open(os.path.join(qdir, "graph.json"), "w") as f:
        json.dump({"model": cfg, "size": size, "epochs": epochs, "batch": batch, "lr": lr}, f)
    weights = {f"{layer.name}/{i}": w for layer in model.layers
               for i, w in enumerate(layer.get_weights())}
    np.savez(os.path.join(qdir, "weights.npz"), **weights)
    np.savez(os.path.join(qdir, "train.npz"), images=train.images[keep], masks=train.masks[keep])
    proc = subprocess.run([sys.executable, "-m", "extras.qat", qdir], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        # The child's own one-line error, else the last line that names an error (a traceback's).
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        said = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        errors = said or [line for line in lines if "Error" in line] or lines or ["no output"]
        raise common.Error("--qat", f"the child process failed: {common.one_line(errors[-1])}",
                           exit_code=1)
    with open(os.path.join(qdir, "qat.json")) as f:
        summary = json.load(f)
    os.replace(os.path.join(qdir, "model_int8_qat.tflite"),
               os.path.join(work, "model_int8_qat.tflite"))
    shutil.rmtree(qdir)
    return summary


# ----------------------------------------------------------------------------------------------
# The child process: Keras 3 config -> tf_keras, fake quantization, fine-tuning, int8 conversion


def to_tf_keras(cfg, weights):
    """A tf_keras (Keras 2) copy of a Keras 3 functional model: tfmot 0.8.1 quantizes only tf_keras
    models. Same layer classes and arguments (those tf_keras knows), same names, same weights
    (`weights`: "layer/i" -> array)."""
    import inspect

    import tf_keras

    tensors = {}

    def resolve(arg):
        if isinstance(arg, list):
            return [resolve(a) for a in arg]
        if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
            name, _, index = arg["config"]["keras_history"]
            return tensors[(name, index)]
        return arg

    for entry in cfg["layers"]:
        name, conf = entry["name"], entry["config"]
        if entry["class_name"] == "InputLayer":
            tensors[(name, 0)] = tf_keras.Input(shape=conf["batch_shape"][1:], name=name)
            continue
        if entry["class_name"] == "Rescaling":
            # tfmot cannot quantize Rescaling (it would stay a float MUL + ADD between DEQUANTIZE
            # and QUANTIZE); the same affine map as a 1x1 depthwise convolution quantizes like any
            # conv.
            layer = tf_keras.layers.DepthwiseConv2D(1, name=name)
            tensors[(name, 0)] = layer(resolve(entry["inbound_nodes"][0]["args"][0]))
            channels = layer.get_weights()[0].shape[2]
            scale = np.broadcast_to(np.asarray(conf["scale"], np.float32), (channels,))
            offset = np.broadcast_to(np.asarray(conf["offset"], np.float32), (channels,))
            layer.set_weights([scale.reshape(1, 1, channels, 1), offset.copy()])
            continue
        cls = getattr(tf_keras.layers, entry["class_name"], None)
        if cls is None or len(entry["inbound_nodes"]) != 1:
            raise common.Error("QAT", f"layer {name} ({entry['class_name']}) has no tf_keras "
                               "equivalent")
        allowed = set(inspect.signature(cls.__init__).parameters) | {"name", "trainable"}
        # Initializers / regularizers are Keras 3 objects; the weights are copied below anyway.
        kwargs = {k: v for k, v in conf.items() if k in allowed and not isinstance(v, dict)}
        if entry["class_name"] == "BatchNormalization":
            # Frozen statistics: fine-tuning on a few hundred images in small batches would
            # otherwise drag the moving mean/variance (momentum 0.9) towards noisy batch statistics.
            kwargs["trainable"] = False
        layer = cls(**kwargs, dtype="float32")
        node = entry["inbound_nodes"][0]
        outputs = layer(*[resolve(a) for a in node["args"]], **node["kwargs"])
        for i, out in enumerate(outputs if isinstance(outputs, list) else [outputs]):
            tensors[(name, i)] = out
        count = sum(k.startswith(name + "/") for k in weights.files)
        if count:
            layer.set_weights([weights[f"{name}/{i}"] for i in range(count)])
    return tf_keras.Model(tensors[endpoint(cfg["input_layers"])],
                          tensors[endpoint(cfg["output_layers"])])


def endpoint(layers):
    """(name, index) of a config's one input or output: [name, node, index] or a list of one."""
    name, _, index = layers[0] if isinstance(layers[0], list) else layers
    return name, index


def fine_tune(qdir):
    """The child's work: the tf_keras copy, quantize_model, fit, convert to int8."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    with open(os.path.join(qdir, "graph.json")) as f:
        spec = json.load(f)
    size = spec["size"]
    # 1. The tf_keras copy of the Keras 3 graph.
    model = to_tf_keras(spec["model"], np.load(os.path.join(qdir, "weights.npz")))

    # 2. Fake-quantize every layer with tfmot's default 8-bit scheme (batch norm folds into its
    # conv).
    qat = tfmot.quantization.keras.quantize_model(model)

    # 3. Fine-tune with BCE + soft Dice (unet.py's bce_dice, restated in TF for tf_keras).
    def bce_dice(y, p):
        p = tf.clip_by_value(p, 1e-7, 1 - 1e-7)
        bce = -tf.reduce_mean(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p), axis=[1, 2, 3])
        dice = (2 * tf.reduce_sum(y * p, [1, 2, 3]) + 1) / (tf.reduce_sum(y + p, [1, 2, 3]) + 1)
        return bce + 1 - dice

    train = np.load(os.path.join(qdir, "train.npz"))
    x = train["images"].astype(np.float32)
    y = train["masks"][..., None].astype(np.float32)
    # Every batch spans 0..255, so the uint8 input gets scale 1, zero point 0 (raw camera bytes).
    x[:, 0, 0], x[:, 0, 1] = 0, 255
    qat.compile(tf_keras.optimizers.Adam(spec["lr"]), bce_dice)
    stats = [(w, w.numpy()) for w in qat.weights
             if "moving_mean" in w.name or "moving_variance" in w.name]
    history = qat.fit(x, y, batch_size=spec["batch"], epochs=spec["epochs"], shuffle=True,
                      verbose=0)
    drift = max((float(np.abs(w.numpy() - before).max()) for w, before in stats), default=None)

    # 4. Convert with a fixed batch of 1 (as export.py's files), uint8 in and out.
    image = tf_keras.Input(batch_shape=(1, size, size, 3), name="image")
    fixed = tf_keras.Model(image, qat(image, training=False))
    converter = tf.lite.TFLiteConverter.from_keras_model(fixed)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]  # ranges come from the fake-quant nodes
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    with open(os.path.join(qdir, "model_int8_qat.tflite"), "wb") as f:
        f.write(converter.convert())
    with open(os.path.join(qdir, "qat.json"), "w") as f:
        json.dump({"epochs": spec["epochs"], "images": len(x), "lr": spec["lr"],
                   "loss": [round(float(v), 5) for v in history.history["loss"]],
                   "bn_statistics": len(stats), "bn_statistics_drift": drift}, f)


@common.command
def main(argv=None):
    parser = common.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="run_qat's folder (graph.json, weights.npz, train.npz)")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.folder, "graph.json")):
        raise common.Error(args.folder, "not a QAT folder (no graph.json: export.py --qat "
                           "writes one)")
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported: tfmot needs tf_keras
    fine_tune(args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
