"""extras/step_forms.py: --upsample matmul and --pool reshape are the default layers' functions in
other forms: same outputs and gradients for the same weights, a fixed size required, and saved files
that load in a bare session."""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import unet


def pixels(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def variant_weights(stock, variant):
    """The stock model's weights in the variant's layout: a Conv2DTranspose kernel (2, 2, f, c) is the
    matmul's (c, 4f) kernel with columns ordered (dy, dx, f); its bias serves all 4 block positions."""
    weights = []
    for a, b in zip([x for x in stock.layers if x.weights], [x for x in variant.layers if x.weights]):
        w = a.get_weights()
        if isinstance(a, keras.layers.Conv2DTranspose) and isinstance(b, keras.layers.Dense):
            kernel, bias = w
            w = [np.transpose(kernel, (3, 0, 1, 2)).reshape(kernel.shape[3], -1), np.tile(bias, 4)]
        weights.append((b, w))
    return weights


def loss_and_grads(model, x, y):
    """bce_dice of a training-mode forward pass and its gradients, by variable path."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        with tf.GradientTape() as tape:
            loss = keras.ops.mean(unet.bce_dice(y, model(x, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
    else:
        import jax
        train_vars = [v.value for v in model.trainable_variables]
        other = [v.value for v in model.non_trainable_variables]

        def f(tv):
            out, _ = model.stateless_call(tv, other, x, training=True)
            return keras.ops.mean(unet.bce_dice(y, out))
        loss, grads = jax.value_and_grad(f)(train_vars)
    return float(loss), {v.path: keras.ops.convert_to_numpy(g) for v, g in zip(model.trainable_variables, grads)}


@pytest.mark.parametrize("upsample,pool", [("matmul", "max"), ("transpose", "reshape"), ("matmul", "reshape")])
def test_step_variants_are_the_same_function_with_the_same_gradients(upsample, pool):
    size, filters, depth = 32, 4, 3
    stock = unet.build_unet(size, filters, depth)
    variant = unet.build_unet(size, filters, depth, upsample=upsample, pool=pool)
    for layer, w in variant_weights(stock, variant):
        layer.set_weights(w)
    x = pixels(3, size, seed=1).astype("float32")
    y = (np.random.default_rng(2).random((3, size, size, 1)) > 0.6).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variant(x, training=True)),
                               keras.ops.convert_to_numpy(stock(x, training=True)), atol=1e-5)
    loss_a, grads_a = loss_and_grads(stock, x, y)
    loss_b, grads_b = loss_and_grads(variant, x, y)
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    matched = 0
    for a_layer, b_layer in zip([x for x in stock.layers if x.weights], [x for x in variant.layers if x.weights]):
        for va, vb in zip(a_layer.trainable_variables, b_layer.trainable_variables):
            ga, gb = grads_a[va.path], grads_b[vb.path]
            if ga.ndim == 4 and gb.ndim == 2:  # the up-sampling kernel, in the matmul's layout
                ga = np.transpose(ga, (3, 0, 1, 2)).reshape(gb.shape)
            elif ga.shape != gb.shape:  # its bias: one per block position, summed
                gb = gb.reshape(4, -1).sum(axis=0)
            np.testing.assert_allclose(gb, ga, atol=1e-5, rtol=1e-4, err_msg=va.path)
            matched += 1
    assert matched == len(stock.trainable_variables)
    with pytest.raises(ValueError, match="fixed size"):
        unet.build_unet(None, filters, depth, upsample=upsample, pool=pool)


@pytest.mark.slow
def test_step_variants_save_and_load_in_a_bare_session(tmp_path):
    model = unet.build_unet(32, filters=4, depth=2, upsample="matmul", pool="reshape")
    x = pixels(2, 32, seed=3)
    path = str(tmp_path / "variant.keras")
    model.save(path)
    want = model.predict(x, verbose=0)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, keras; m = keras.models.load_model(sys.argv[1], compile=False); "
            "p = m.predict(np.load(sys.argv[2]), verbose=0); np.save(sys.argv[3], p); "
            "assert 'unet' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code, path, str(tmp_path / "x.npy"), str(tmp_path / "p.npy")],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), want, atol=1e-6)
