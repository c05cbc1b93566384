"""extras/encoders.py: the keras.applications backbones that train.py --encoder builds the U-Net on."""

import keras
import numpy as np
import pytest

from extras import encoders


@pytest.mark.parametrize("encoder", ["mobilenetv3small", "efficientnetb0", "resnet50"])
def test_encoder_variants_build_without_weights(encoder):
    model = encoders.build_encoder_unet(64, 4, encoder, None)
    assert model.output_shape == (None, 64, 64, 1)
    features = model.get_layer(f"{encoder}_encoder").output
    assert [f.shape[1] for f in features] == [32, 16, 8, 4, 2]
    with pytest.raises(ValueError):
        encoders.build_encoder_unet(48, 12, encoder)  # 5 strides: 32 must divide the size


def test_resnet_encoder_gets_caffe_preprocessing_from_raw_rgb():
    model = encoders.build_encoder_unet(32, 4, "resnet50")
    rgb = np.array([[[[10.0, 20.0, 30.0]]]], "float32")
    bgr = keras.ops.convert_to_numpy(model.get_layer("caffe_bgr")(rgb))
    np.testing.assert_allclose(bgr[0, 0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], atol=1e-4)
    np.testing.assert_allclose(encoders.CAFFE_MEAN_BGR, (103.939, 116.779, 123.68))
    assert not model.get_layer("caffe_bgr").trainable_weights


def test_unknown_encoder_is_a_one_line_value_error():
    with pytest.raises(ValueError, match="encoder 'vgg16' is not one of none, mobilenetv3, "):
        encoders.build_encoder_unet(64, 4, "vgg16")
