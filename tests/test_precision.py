"""extras/precision.py: a mixed-precision model rebuilt in float32. export.py brings it in only when
is_mixed finds such a layer; the export of one is tests/test_export.py's test_mixed_precision_model_exports."""
import keras
import numpy as np

import export
import unet
from extras import precision


def test_float32_copy_of_a_mixed_model_has_float32_layers_and_the_same_weights():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = unet.build_unet(32, filters=4, depth=2)
    finally:
        keras.config.set_dtype_policy("float32")
    image = keras.Input((32, 32, 3))
    assert export.is_mixed(mixed) and export.is_mixed(keras.Model(image, mixed(image)))  # nested too
    copy = precision.float32_copy(mixed)
    assert not export.is_mixed(copy) and not export.is_mixed(unet.build_unet(32, filters=4, depth=2))
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    for a, b in zip(mixed.get_weights(), copy.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    diff = np.abs(copy.predict(x, verbose=0) - mixed.predict(x, verbose=0))
    assert diff.max() < 0.05  # the same network, bfloat16 rounding apart
