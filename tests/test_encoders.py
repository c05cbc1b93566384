"""extras/encoders.py: the keras.applications backbones that unet.build_unet(encoder=...) brings in."""
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import ROOT

import unet
from extras import encoders


@pytest.mark.parametrize("encoder", ["mobilenetv3small", "efficientnetb0", "resnet50"])
def test_encoder_variants_build_without_weights(encoder):
    model = unet.build_unet(64, filters=4, encoder=encoder, encoder_weights=None)
    assert model.output_shape == (None, 64, 64, 1)
    features = model.get_layer(f"{encoder}_encoder").output
    assert [f.shape[1] for f in features] == [32, 16, 8, 4, 2]
    with pytest.raises(ValueError):
        unet.build_unet(48, encoder=encoder)  # 5 strides: 32 must divide the size


def test_resnet_encoder_gets_caffe_preprocessing_from_raw_rgb():
    model = unet.build_unet(32, filters=4, encoder="resnet50")
    rgb = np.array([[[[10.0, 20.0, 30.0]]]], "float32")
    bgr = keras.ops.convert_to_numpy(model.get_layer("caffe_bgr")(rgb))
    np.testing.assert_allclose(bgr[0, 0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], atol=1e-4)
    np.testing.assert_allclose(encoders.CAFFE_MEAN_BGR, (103.939, 116.779, 123.68))
    assert not model.get_layer("caffe_bgr").trainable_weights


def test_unknown_encoder_is_a_one_line_value_error():
    with pytest.raises(ValueError, match="encoder 'vgg16' is not one of none, mobilenetv3, "):
        unet.build_unet(64, filters=4, encoder="vgg16")


def test_the_plain_unet_does_not_import_the_encoders():
    code = "import sys, unet; unet.build_unet(32, 4, 2); assert 'extras.encoders' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
