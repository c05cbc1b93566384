"""unet.py: model shapes and sizes, saving, and property tests of the losses and metrics, the
Lovász half of bce_lovasz (extras/lovasz.py) among them. The pretrained encoders (extras/encoders.py)
are tests/test_encoders.py's, the step's other forms (extras/step_forms.py) tests/test_step_forms.py's."""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import ROOT
from hypothesis import given, settings, strategies as st

import common
import unet
from extras import lovasz


def pixels(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("size,depth,filters", [(32, 2, 4), (48, 4, 4), (64, 3, 6)])
def test_output_shape_dtype_and_range(size, depth, filters):
    model = unet.build_unet(size, filters=filters, depth=depth)
    assert model.input.name == "image" and model.output_shape == (None, size, size, 1)
    out = model.predict(pixels(2, size), verbose=0)
    assert out.shape == (2, size, size, 1) and out.dtype == np.float32
    # the head is a float32 sigmoid of the logits layer, not some other squashing
    keras = common.import_keras()
    logits = keras.Model(model.input, model.get_layer("logits").output).predict(pixels(2, size), verbose=0)
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-logits.astype(np.float64))), atol=1e-6)
    # uint8 and float inputs of the same pixels are the same image
    np.testing.assert_allclose(out, model.predict(pixels(2, size).astype("float32"), verbose=0), atol=1e-6)


def test_any_size_when_size_is_none():
    model = unet.build_unet(None, filters=4, depth=2)
    for size in (16, 40):
        assert model.predict(pixels(1, size), verbose=0).shape == (1, size, size, 1)


def test_removed_bilinear_upsampling_is_a_one_line_value_error():
    # "bilinear" and bottleneck dropout were build_unet arguments no run or flag used (issue 31):
    # gone, and asking for bilinear says what the choices are.
    with pytest.raises(ValueError, match="upsample 'bilinear' is not one of transpose, matmul$"):
        unet.build_unet(32, filters=4, depth=2, upsample="bilinear")


@pytest.mark.parametrize("size,depth", [(30, 2), (100, 4), (8, 4), (0, 1), (-16, 2), (32.0, 2)])
def test_invalid_size_is_a_one_line_value_error(size, depth):
    with pytest.raises(ValueError) as e:
        unet.build_unet(size, filters=4, depth=depth)
    assert "\n" not in str(e.value) and str(2 ** depth) in str(e.value)


def test_base_32_parameter_count_matches_the_pytorch_peer():
    # 7.76 M trainable in PyTorch + the batch-norm running statistics Keras counts too
    model = unet.build_unet(filters=32)
    assert 7.76e6 <= model.count_params() <= 7.8e6
    assert model.input_shape == (None, 256, 256, 3)
    # the default (base 12, chosen for the CPU protocol) is the same network at 12/32 of the width
    assert 1.05e6 <= unet.build_unet().count_params() <= 1.12e6


def test_mixed_precision_output_is_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = unet.build_unet(32, filters=4, depth=2)
        assert model.get_layer("enc0_conv1").compute_dtype == "bfloat16"
        out = model.predict(pixels(1, 32), verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == np.float32 and model.output.dtype == "float32"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dice", "bce_lovasz"])
def test_save_load_round_trip(tmp_path, loss):
    fn = lovasz.bce_lovasz if loss == "bce_lovasz" else unet.LOSSES[loss]  # (--loss bce_lovasz's)
    model = unet.compile_model(unet.build_unet(32, filters=4, depth=2), loss=fn)
    x = pixels(4, 32)
    y = (x[..., :1] > 128).astype("float32")
    model.fit(x, y, epochs=1, batch_size=2, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # compile=True: needs the registered loss / metrics
    assert loaded.loss is fn
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    assert {"loss", "dice", "iou"} <= set(loaded.evaluate(x, y, verbose=0, return_dict=True))
    # bare session: no `import unet`, not even this repository on the path
    code = ("import sys, numpy as np, keras; m = keras.models.load_model(sys.argv[1], compile=False); "
            "p = m.predict(np.full((1, 32, 32, 3), 99, np.uint8), verbose=0); "
            "assert 'unet' not in sys.modules; print(p.shape, p.dtype)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code, path], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(1, 32, 32, 1) float32" in r.stdout


def test_the_default_model_and_loss_import_no_extras():
    # the step forms and the Lovász loss are imported only when build_unet / the loss asks for them
    code = ("import sys, numpy as np, unet; m = unet.build_unet(32, 4, 2); "
            "x = np.ones((1, 32, 32, 3), 'float32'); unet.bce_dice(x[..., :1], m(x)); "
            "loaded = [k for k in sys.modules if k.startswith('extras')]; assert loaded == [], loaded")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("loss", ["focal", "BCE_DICE", ""])
def test_compile_model_unknown_loss_is_a_one_line_value_error(loss):
    model = unet.build_unet(32, filters=4, depth=2)
    with pytest.raises(ValueError) as e:
        unet.compile_model(model, loss=loss)
    message = str(e.value)
    assert "\n" not in message and repr(loss) in message
    assert all(name in message for name in unet.LOSSES)  # it says what would have worked
    assert not model.compiled  # nothing half-done


# --- losses and metrics ------------------------------------------------------------------------------
def np_dice(t, p):
    """NumPy reference: per-image Dice of truth > 0.5 vs prob > 0.5, empty/empty = 1."""
    t, p = t.reshape(len(t), -1) > 0.5, p.reshape(len(p), -1) > 0.5
    tp = (t & p).sum(1)
    den = t.sum(1) + p.sum(1)
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0)


def np_iou(t, p):
    t, p = t.reshape(len(t), -1) > 0.5, p.reshape(len(p), -1) > 0.5
    tp, union = (t & p).sum(1), (t | p).sum(1)
    return np.where(union > 0, tp / np.maximum(union, 1), 1.0)


def np_(x):
    return keras.ops.convert_to_numpy(x)


masks = st.builds(lambda seed, n, s, density: (np.random.default_rng(seed).random((n, s, s, 1)) < density)
                  .astype("float32"),
                  st.integers(0, 2 ** 31), st.integers(1, 4), st.integers(1, 9), st.sampled_from([0.0, 0.05, 0.5, 1.0]))


@settings(max_examples=30, deadline=None)
@given(masks, st.integers(0, 2 ** 31))
def test_metrics_match_numpy_reference_and_are_symmetric(truth, seed):
    prob = np.random.default_rng(seed).random(truth.shape).astype("float32")
    d = np_(unet.dice_per_image(truth, prob))
    i = np_(unet.iou_per_image(truth, prob))
    np.testing.assert_allclose(d, np_dice(truth, prob), atol=1e-6)
    np.testing.assert_allclose(i, np_iou(truth, prob), atol=1e-6)
    assert np.all((d >= 0) & (d <= 1)) and np.all((i >= 0) & (i <= 1)) and np.all(i <= d + 1e-6)
    binary = (prob > 0.5).astype("float32")
    np.testing.assert_allclose(np_(unet.dice_per_image(truth, binary)), np_(unet.dice_per_image(binary, truth)), atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(masks)
def test_perfect_prediction_scores_one_and_loss_is_near_minimum(truth):
    for fn in (unet.dice_per_image, unet.iou_per_image):
        np.testing.assert_allclose(np_(fn(truth, truth)), 1.0)
    for name, loss in unet.LOSSES.items():
        best = np_(loss(truth, truth))
        assert best.shape == (len(truth),) and np.all(best < 1e-5), name
        worse = np_(loss(truth, np.clip(1 - truth, 0.1, 0.9)))
        assert np.all(worse > best), name


@settings(max_examples=30, deadline=None)
@given(masks, st.integers(0, 2 ** 31))
def test_losses_are_bounded_and_symmetric_soft_dice(truth, seed):
    prob = np.random.default_rng(seed).random(truth.shape).astype("float32")
    d = np_(unet.dice(truth, prob))
    assert np.all((d >= 0) & (d <= 1))
    assert np.all(np_(unet.bce(truth, prob)) >= 0)
    np.testing.assert_allclose(d, np_(unet.dice(prob, truth)), atol=1e-6)
    # bfloat16 predictions (mixed precision) are computed in float32
    low = np_(unet.bce_dice(truth, keras.ops.cast(prob, "bfloat16")))
    assert low.dtype == np.float32 and np.all(np.isfinite(low))


@settings(max_examples=30, deadline=None)
@given(masks, st.integers(0, 2 ** 31))
def test_lovasz_is_one_minus_jaccard_on_hard_masks_and_bounded_between(truth, seed):
    prob = np.random.default_rng(seed).random(truth.shape).astype("float32")
    hard = (prob > 0.5).astype("float32")
    # at the corners of the cube it is the challenge's per-image score itself (empty/empty: loss 0)
    np.testing.assert_allclose(np_(lovasz.lovasz(truth, hard)), 1 - np_iou(truth, hard), atol=1e-6)
    soft = np_(lovasz.lovasz(truth, prob))
    assert soft.shape == (len(truth),) and np.all((soft >= -1e-6) & (soft <= 1 + 1e-6))
    # convex extension: a blend of two hard predictions costs at most the blend of their costs
    other = 1 - hard
    mid = np_(lovasz.lovasz(truth, 0.5 * hard + 0.5 * other))
    assert np.all(mid <= 0.5 * np_(lovasz.lovasz(truth, hard)) + 0.5 * np_(lovasz.lovasz(truth, other)) + 1e-6)


def test_metric_averages_per_image_not_pooled():
    truth = np.zeros((2, 8, 8, 1), "float32")
    truth[0, :4] = 1  # a big lesion, found
    truth[1, 0, 0] = 1  # a one-pixel lesion, missed
    pred = truth.copy()
    pred[1] = 0
    metric = unet.DiceScore()
    metric.update_state(truth[:1], pred[:1])
    metric.update_state(truth[1:], pred[1:])
    assert float(metric.result()) == pytest.approx(0.5)  # pooled Dice would be 64/65
    metric.reset_state()  # a reset metric forgets both images: a fresh start, not a running mean
    assert float(metric.result()) == 0.0
    metric.update_state(truth[1:], pred[1:])
    assert float(metric.result()) == 0.0  # only the missed lesion counts now (with the old one: 0.5)
    assert unet.DiceScore.from_config(metric.get_config()).threshold == 0.5


# train.py checks its flags before importing Keras (a typo fails in a moment), so it names the losses,
# encoders and the size rule itself; these two tests keep those names and that rule unet.py's own.
def test_train_flag_choices_are_unets():
    import train
    from extras import encoders

    choices = {a.dest: set(a.choices) for a in train.parser()._actions if a.choices}
    assert choices["loss"] == {*unet.LOSSES, "bce_lovasz"}
    assert choices["encoder"] == {"none", *encoders.ENCODERS}
    assert choices["upsample"] == set(unet.UPSAMPLES) and choices["pool"] == set(unet.POOLS)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 600), st.integers(1, 5), st.sampled_from(["none", "mobilenetv3"]))
def test_train_size_rule_is_unets(size, depth, encoder):
    import train

    try:
        unet.check_size(size, depth if encoder == "none" else 5)
        unet_ok = True
    except ValueError:
        unet_ok = False
    try:
        train.config_of(["--size", str(size), "--depth", str(depth), "--encoder", encoder])
        train_ok = True
    except common.Error:
        train_ok = False
    assert train_ok == unet_ok
