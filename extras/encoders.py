"""Pretrained keras.applications backbones as the U-Net's encoder: train.py --encoder NAME builds
its model with build_encoder_unet instead of unet.build_unet. It reuses unet.py's decoder and head;
the plain U-Net never imports it.

Each backbone has 5 feature levels (strides 2..32). The skips are the deepest layer at each stride,
found by output resolution rather than by name because MobileNetV3's activation layers get
auto-generated names; for ResNet50 / EfficientNetB0 this picks the usual named layers (conv1_relu,
conv2_block3_out, ... / block2a_expand_activation, ...). MobileNetV3 and EfficientNet rescale 0..255
themselves (include_preprocessing); ResNet50 expects caffe-style BGR minus the ImageNet mean, done
here by a frozen 1x1 convolution, so the whole model still takes raw RGB 0..255 with built-in layers
only (a saved model loads in a bare session).
"""
import keras
import numpy as np
from keras import layers

import unet

ENCODERS = {
    "mobilenetv3": ("MobileNetV3Large", {"include_preprocessing": True}),
    "mobilenetv3small": ("MobileNetV3Small", {"include_preprocessing": True}),
    "efficientnetb0": ("EfficientNetB0", {}),
    "resnet50": ("ResNet50", {}),
}
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
STRIDES = (2, 4, 8, 16, 32)


def encoder_features(image, encoder, weights):
    """[stride-2, 4, 8, 16, 32 features] of a keras.applications backbone on raw RGB 0..255."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder {encoder!r} is not one of none, {', '.join(ENCODERS)}")
    fn_name, kwargs = ENCODERS[encoder]
    backbone = getattr(keras.applications, fn_name)(
        input_shape=tuple(image.shape[1:]), include_top=False, weights=weights, **kwargs)
    size = image.shape[1]
    picked = {}
    # Topological order: the last layer seen at a stride is the deepest one there.
    for layer in backbone.layers:
        shape = layer.output.shape
        if len(shape) == 4 and shape[1] and not layer.name.endswith("_pad") and shape[1] < size:
            picked[size // shape[1]] = layer.output
    missing = [s for s in STRIDES if s not in picked]
    if missing:
        raise ValueError(f"encoder {encoder}: no features at stride {missing} for size {size}")
    extractor = keras.Model(backbone.input, [picked[s] for s in STRIDES], name=f"{encoder}_encoder")
    x = image
    if fn_name == "ResNet50":
        caffe = layers.Conv2D(3, 1, name="caffe_bgr", trainable=False)
        x = caffe(x)
        rgb_to_bgr = np.eye(3)[::-1].reshape(1, 1, 3, 3)
        caffe.set_weights([rgb_to_bgr, -np.array(CAFFE_MEAN_BGR)])
    return extractor(x)


def build_encoder_unet(size, filters, encoder, encoder_weights=None, upsample="transpose"):
    """The U-Net with a keras.applications backbone as its encoder: 5 strides, so size must be a
    multiple of 32 (and fixed). encoder_weights="imagenet" downloads the ImageNet weights on first
    use (to ~/.keras/models), None starts from random weights."""
    unet.check_size(size, len(STRIDES))
    if size is None:
        raise ValueError("a pretrained encoder needs a fixed size")
    image = keras.Input((size, size, 3), name="image")
    *skips, x = encoder_features(image, encoder, encoder_weights)
    # Full resolution has no backbone feature: no skip at the top level.
    x = unet.decoder(x, [None] + skips, filters, upsample)
    return keras.Model(image, unet.head(x), name=f"unet_{encoder}")
