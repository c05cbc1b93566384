"""The U-Net, its losses and its metrics, in pure Keras 3 (tensorflow, jax and torch backends).

    model = build_unet(size=256)            # raw RGB 0..255 in, float32 lesion probability out
    compile_model(model, loss="bce_dice")   # Adam + per-image Dice / IoU metrics

The U-Net of Ronneberger et al. (2015) with batch norm: (Conv3x3-BN-ReLU) x2 per level, 2x2
max-pooling down, 2x2 stride-2 transposed convolution up, skip connections by concatenation and a
1x1 sigmoid head. Base 12 filters (1.10 M parameters) is the widest that trains the README's CPU
protocol in time; filters=32 is the paper's size, the PyTorch peer's (docs/training.md). Options
that build on these pieces live in extras/: the step in other forms (step_forms.py, named below at
up() and down()), a pretrained encoder (encoders.py) and the Lovász loss (lovasz.py), both named by
train.py where it builds and compiles the model.

The model normalizes its own input (a Rescaling layer), so every saved or exported model takes
camera bytes directly: no preprocessing contract for a phone app to get wrong. Only built-in layers
are used, so `keras.models.load_model(path, compile=False)` works in a bare Python session;
`import unet` first to load with compile=True (it registers the losses and metrics below).
"""
import keras
from keras import layers, ops

PACKAGE = "skin_unet"  # namespace of the registered losses / metrics inside saved .keras files
UPSAMPLES = ("transpose", "matmul")
POOLS = ("max", "reshape")


def check_size(size, depth):
    """One-line ValueError unless `size` (None: any) halves `depth` times without remainder."""
    if size is None:
        return
    step = 2 ** depth
    if isinstance(size, bool) or not isinstance(size, int) or size < step or size % step:
        raise ValueError(f"size {size!r} is not a positive multiple of 2**depth = {step} "
                         f"(depth {depth})")


def conv_block(x, filters, name):
    """(Conv3x3-BN-ReLU) x2. No conv bias: batch norm's beta plays that role. BN momentum 0.9
    (PyTorch's default, as in the peer): with Keras' 0.99 the inference statistics of a short run
    still lean on their initial values and validation collapses (docs/training.md)."""
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                          kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def up(x, filters, upsample, name):
    # Conv2DTranspose becomes one TFLite TRANSPOSE_CONV op, which XNNPACK (CPU), the LiteRT GPU
    # delegate and int8 quantization all handle, and it is what the PyTorch peer uses.
    if upsample == "transpose":
        return layers.Conv2DTranspose(filters, 2, strides=2, name=f"{name}_up")(x)
    if upsample not in UPSAMPLES:
        raise ValueError(f"upsample {upsample!r} is not one of {', '.join(UPSAMPLES)}")
    from extras import step_forms  # --upsample matmul: the same function, for speed
    return step_forms.matmul_up(x, filters, name)


def down(x, pool, name):
    if pool == "max":
        return layers.MaxPooling2D(2, name=name)(x)
    if pool not in POOLS:
        raise ValueError(f"pool {pool!r} is not one of {', '.join(POOLS)}")
    from extras import step_forms  # --pool reshape: the same function, for speed
    return step_forms.reshape_pool(x)


def head(x):
    """1x1 conv to one logit, sigmoid in float32: the output is float32 even in mixed precision."""
    x = layers.Conv2D(1, 1, name="logits")(x)
    return layers.Activation("sigmoid", dtype="float32", name="mask")(x)


def build_unet(size=256, filters=12, depth=4, upsample="transpose", pool="max"):
    """Input "image" (size, size, 3) raw RGB 0..255, output "mask" (size, size, 1) float32 in 0..1.
    size=None accepts any multiple of 2**depth (with the default step forms)."""
    check_size(size, depth)
    image = keras.Input((size, size, 3), name="image")  # float32: the step casts uint8 batches
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="normalize")(image)  # 0..255 -> -1..1
    skips = []
    for level in range(depth):
        x = conv_block(x, filters * 2 ** level, f"enc{level}")
        skips.append(x)
        x = down(x, pool, f"pool{level}")
    x = conv_block(x, filters * 2 ** depth, "bottleneck")
    return keras.Model(image, head(decoder(x, skips, filters, upsample)), name="unet")


def decoder(x, skips, filters, upsample):
    """Up one level per skip, deepest first: up-sample, concatenate the skip (if any), convolve."""
    for level in reversed(range(len(skips))):
        f = filters * 2 ** level
        x = up(x, f, upsample, f"dec{level}")
        if skips[level] is not None:
            x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = conv_block(x, f, f"dec{level}")
    return x


# --- losses ---------------------------------------------------------------------------------------
# All in float32 (mixed precision hands us bfloat16/float16 otherwise), one value per image, so
# Keras averages over the batch the way evaluation averages over images.
SMOOTH = 1.0   # soft-Dice smoothing: an empty mask predicted empty scores 1, gradients stay finite
EPSILON = 1e-7


def per_image(y_true, y_pred):
    y_pred = ops.cast(y_pred, "float32")
    y_true = ops.cast(y_true, "float32")
    if len(y_true.shape) == len(y_pred.shape) - 1:  # (B, H, W) masks against (B, H, W, 1) output
        y_true = ops.expand_dims(y_true, -1)
    axes = tuple(range(1, len(y_pred.shape)))
    return y_true, y_pred, axes


def soft_dice(y_true, y_pred):
    """Per-image soft Dice of probabilities, shape (B,)."""
    t, p, axes = per_image(y_true, y_pred)
    inter = ops.sum(t * p, axis=axes)
    return (2.0 * inter + SMOOTH) / (ops.sum(t, axis=axes) + ops.sum(p, axis=axes) + SMOOTH)


@keras.saving.register_keras_serializable(package=PACKAGE)
def bce(y_true, y_pred):
    """Per-image mean binary cross-entropy."""
    t, p, axes = per_image(y_true, y_pred)
    p = ops.clip(p, EPSILON, 1.0 - EPSILON)
    return -ops.mean(t * ops.log(p) + (1.0 - t) * ops.log(1.0 - p), axis=axes)


@keras.saving.register_keras_serializable(package=PACKAGE)
def dice(y_true, y_pred):
    """Per-image soft-Dice loss, 1 - Dice."""
    return 1.0 - soft_dice(y_true, y_pred)


@keras.saving.register_keras_serializable(package=PACKAGE)
def bce_dice(y_true, y_pred):
    """BCE (pixel-wise, sharp boundaries) + Dice loss (overlap, blind to the lesion/skin ratio)."""
    return bce(y_true, y_pred) + dice(y_true, y_pred)


LOSSES = {"bce_dice": bce_dice, "dice": dice, "bce": bce}  # --loss bce_lovasz: extras/lovasz.py


# --- metrics --------------------------------------------------------------------------------------
def confusion_counts(y_true, y_pred, threshold=0.5):
    """Per-image (tp, fp, fn) of truth > 0.5 against prediction > threshold (as evaluate.py),
    each of shape (B,)."""
    t, p, axes = per_image(y_true, y_pred)
    t = ops.cast(t > 0.5, "float32")
    p = ops.cast(p > threshold, "float32")
    tp = ops.sum(t * p, axis=axes)
    return tp, ops.sum(p, axis=axes) - tp, ops.sum(t, axis=axes) - tp


def _ratio(num, den):
    # An empty truth predicted empty is a perfect score (same convention as evaluate.py).
    return ops.where(den > 0, num / ops.maximum(den, 1.0), 1.0)


def dice_per_image(y_true, y_pred, threshold=0.5):
    tp, fp, fn = confusion_counts(y_true, y_pred, threshold)
    return _ratio(2.0 * tp, 2.0 * tp + fp + fn)


def iou_per_image(y_true, y_pred, threshold=0.5):
    tp, fp, fn = confusion_counts(y_true, y_pred, threshold)
    return _ratio(tp, tp + fp + fn)


class PerImageScore(keras.metrics.Metric):
    """Mean over images of a per-image score at a fixed threshold (not a pooled batch score)."""
    score_fn = None
    default_name = None

    def __init__(self, threshold=0.5, name=None, **kwargs):
        super().__init__(name=name or self.default_name, **kwargs)
        self.threshold = threshold
        self.total = self.add_variable(shape=(), initializer="zeros", name="total", dtype="float32")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        scores = type(self).score_fn(y_true, y_pred, self.threshold)
        self.total.assign_add(ops.sum(scores))
        self.count.assign_add(ops.cast(ops.shape(scores)[0], "float32"))

    def result(self):
        return self.total / ops.maximum(self.count, 1.0)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


@keras.saving.register_keras_serializable(package=PACKAGE)
class DiceScore(PerImageScore):
    score_fn = staticmethod(dice_per_image)
    default_name = "dice"


@keras.saving.register_keras_serializable(package=PACKAGE)
class IoUScore(PerImageScore):
    score_fn = staticmethod(iou_per_image)
    default_name = "iou"


# --- compile --------------------------------------------------------------------------------------
def compile_model(model, loss="bce_dice", lr=1e-3, jit_compile="auto", ema=0.0):
    """Adam + the loss (a name in LOSSES, or a loss function) + per-image Dice / IoU. jit_compile
    "auto" is Keras's own choice (XLA on JAX, and on TensorFlow only with an accelerator); train.py
    decides for itself (jit_rule). ema > 0: the optimizer also keeps a moving average of the
    weights with this momentum (on the device, inside the train step); train.py validates and
    saves best.keras with it."""
    if isinstance(loss, str) and loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is not one of {', '.join(LOSSES)}")
    # ema_momentum is read only when use_ema
    optimizer = keras.optimizers.Adam(lr, use_ema=ema > 0, ema_momentum=ema)
    model.compile(optimizer=optimizer, loss=LOSSES.get(loss, loss),
                  metrics=[DiceScore(), IoUScore()], jit_compile=jit_compile)
    return model
