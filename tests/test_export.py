"""export.py: SavedModel parity, LiteRT files (dtypes, builtin ops, int8 vs Keras), mixed precision,
QAT, atomic publishing and one-line errors. One tiny U-Net (32 px, base 4, depth 2) is trained once
on the synthetic fixture and exported once with everything on; the other tests reuse it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli
from hypothesis import given, settings, strategies as st

import data
import export
import imaging
import inference
import layouts
import metrics
import unet

pytestmark = pytest.mark.slow  # a module of minutes: the full suite runs it, the inner loop does not

SIZE = 32


@pytest.fixture(scope="module")
def trained(train_unet, tmp_path_factory):
    """(path of best.keras, model): trained briefly so its masks are confident, not coin flips."""
    model = train_unet(SIZE, filters=4, depth=2)
    path = str(tmp_path_factory.mktemp("model") / "best.keras")
    model.save(path)
    return path, model


@pytest.fixture(scope="module")
def exported(trained, synthetic_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exp") / "export")
    report = export.export(trained[0], synthetic_data, out, quantize=("int8", "float16"), qat=1,
                           threads=(1,), calibration=20, qat_images=8, bench_runs=2, progress=False)
    return out, report


def all_images(root):
    return data.load_split(root, "all", SIZE, progress=False).images


def native_dice(truth, prob):
    """NumPy reference of the challenge Dice: the probability map resized to the mask's native size."""
    pred = imaging.resize_prob(prob, truth.shape) > 0.5
    tp, total = np.count_nonzero(truth & pred), np.count_nonzero(truth) + np.count_nonzero(pred)
    return 1.0 if total == 0 else 2 * tp / total


def test_files_and_report(exported, trained, synthetic_data):
    out, report = exported
    assert sorted(os.listdir(out)) == ["model.json", "model.onnx", "model_float16.tflite",
                                       "model_float32.tflite", "model_int8.onnx",
                                       "model_int8.tflite", "model_int8_qat.tflite", "report.json",
                                       "saved_model"]
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f) == json.loads(json.dumps(report))  # the file is the returned report
    assert not [n for n in os.listdir(os.path.dirname(out)) if n != "export"]  # no temp folder left

    # What was exported and on which images: the fixture's 20 train / 1 val / 3 test split.
    pairs, _, _ = layouts.find_pairs(synthetic_data)
    val_pairs = [p for p in pairs if p.split == "val"]
    assert len(val_pairs) == 1 and sum(p.split == "train" for p in pairs) == 20
    assert report["weights"] == os.path.abspath(trained[0]) and report["size"] == SIZE
    assert report["data"] == synthetic_data and report["eval_split"] == "val" and report["eval_images"] == 1
    assert report["calibration_images"] == 20  # min(calibration=20, 20 training images)
    assert report["rebuilt_float32_from_mixed_precision"] is False and report["threshold"] == 0.5
    assert report["threads"] == [1] and report["keras"]["params"] == trained[1].count_params()
    assert report["saved_model"]["max_abs_diff_vs_keras"] <= export.SAVED_MODEL_ATOL
    assert report["qat"]["images"] == 8 and report["qat"]["epochs"] == 1
    onnx = report["onnx"]["float32"]  # held to Keras (tests/test_onnx.py checks the file itself)
    assert onnx["file"] == "model.onnx" and onnx["mask_pixels_differing"] == 0
    assert onnx["max_abs_diff_vs_keras"] <= 1e-4 and list(onnx["latency_ms"]) == ["1"]
    assert onnx["dice_vs_truth"] == pytest.approx(report["keras"]["dice_vs_truth"], abs=1e-4)
    int8 = report["onnx"]["int8"]  # static int8 (QDQ): held as the int8 .tflite is
    assert int8["file"] == "model_int8.onnx" and int8["mean_abs_diff_vs_keras"] <= 0.05
    assert int8["dice_vs_keras"] >= 0.9 and list(int8["latency_ms"]) == ["1"]

    # Dice against the truth, recomputed here at the mask's native resolution (not at 32 px).
    image = data.load_split(synthetic_data, "val", SIZE, progress=False).images
    prob = trained[1].predict(image.astype(np.float32), verbose=0)[0, ..., 0]
    want = native_dice(imaging.load_mask(val_pairs[0].mask), prob)
    assert 0 < want < 1
    assert report["keras"]["dice_vs_truth"] == pytest.approx(want, abs=1e-6)
    # float32 LiteRT is the Keras model up to summation order: the same masks, the same score.
    assert report["tflite"]["float32"]["dice_vs_truth"] == pytest.approx(want, abs=1e-3)

    assert list(report["tflite"]) == ["float32", "int8", "float16", "int8_qat"]
    for kind, row in report["tflite"].items():
        name = f"model_{kind}.tflite"
        assert row["file"] == name
        assert row["size_mb"] == round(os.path.getsize(os.path.join(out, name)) / 1e6, 3)
        assert list(row["latency_ms"]) == ["1"] and row["latency_ms"]["1"] > 0
        assert 0 <= row["dice_vs_truth"] <= 1
        integer = kind.startswith("int8")
        for tensor, shape in (("input", [1, SIZE, SIZE, 3]), ("output", [1, SIZE, SIZE, 1])):
            contract = row[tensor]
            assert contract["shape"] == shape and contract["dtype"] == ("uint8" if integer else "float32")
            if integer:  # raw camera bytes in, probability q / 256 out
                assert (contract["scale"], contract["zero_point"]) == ((1.0, 0) if tensor == "input" else (1 / 256, 0))
            else:
                assert (contract["scale"], contract["zero_point"]) == (0.0, 0)
        if integer:
            assert row["float32_tensors"] == 0
    float32 = report["tflite"]["float32"]
    assert float32["max_abs_diff_vs_keras"] <= export.FLOAT32_ATOL and float32["dice_vs_keras"] >= 0.999
    assert report["tflite"]["float16"]["mean_abs_diff_vs_keras"] <= export.FLOAT16_MEAN_ATOL
    assert report["tflite"]["int8"]["mean_abs_diff_vs_keras"] <= export.INT8_MEAN_ATOL


def test_every_exported_file_flags_by_the_runs_review_threshold(trained, synthetic_data, tmp_path):
    """model.json carries the run's size, data and review threshold beside every exported file, so
    an int8 file copied elsewhere with it flags photos as the .keras it came from does."""
    import shutil
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(trained[0], run / "best.keras")
    (run / "run.json").write_text(json.dumps({"size": SIZE, "review_threshold": 0.123,
                                              "data": synthetic_data}))
    out = tmp_path / "export"
    export.export(str(run / "best.keras"), None, str(out), quantize=("int8",), threads=(1,),
                  calibration=8, bench_runs=1, progress=False, onnx=False)
    known = json.loads((out / "model.json").read_text())
    assert (known["size"], known["review_threshold"], known["data"]) == (SIZE, 0.123, synthetic_data)
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    for name in ("model_int8.tflite", "model.json"):
        shutil.copyfile(out / name, alone / name)
    predictor = inference.load_predictor(str(alone / "model_int8.tflite"))
    assert (predictor.review_threshold, predictor.review_source) == (0.123, "from model.json")


def test_saved_model_reload_matches_keras(exported, trained, synthetic_data):
    import tensorflow as tf

    images = all_images(synthetic_data)
    serve = tf.saved_model.load(os.path.join(exported[0], "saved_model")).signatures["serving_default"]
    got = serve(image=tf.constant(images, tf.float32))["mask"].numpy()
    want = trained[1].predict(images.astype(np.float32), verbose=0)
    assert got.shape == want.shape == (len(images), SIZE, SIZE, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name, dtype", [("model_float32.tflite", np.float32), ("model_int8.tflite", np.uint8),
                                         ("model_int8_qat.tflite", np.uint8)])
def test_tflite_dtypes_and_builtin_ops_only(exported, name, dtype):
    interp, inp, out, ops = export.tflite_info(os.path.join(exported[0], name))
    assert inp["dtype"] == dtype and out["dtype"] == dtype
    assert tuple(inp["shape"]) == (1, SIZE, SIZE, 3) and tuple(out["shape"]) == (1, SIZE, SIZE, 1)
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"]
    if dtype == np.uint8:
        # Raw camera bytes: scale 1, zero point 0 in; probability q / 256 out; no float op inside.
        assert inp["quantization"] == (1.0, 0) and out["quantization"] == (1 / 256, 0)
        assert not [t for t in interp.get_tensor_details() if t["dtype"] == np.float32]


def test_int8_masks_agree_with_keras(exported, trained, synthetic_data):

    images = all_images(synthetic_data)
    keras_masks = trained[1].predict(images.astype(np.float32), verbose=0)[..., 0] > 0.5
    assert keras_masks.mean() > 0.05  # the model found lesions; agreement is not "both empty"
    probs = inference.load_predictor(os.path.join(exported[0], "model_int8.tflite")).predict(images)
    assert np.mean(metrics.image_scores(keras_masks, probs > 0.5)["dice"]) >= 0.98
    assert exported[1]["tflite"]["int8"]["dice_vs_keras"] >= 0.98


def test_qat_keeps_batch_norm_statistics_frozen(exported, trained):
    # Fine-tuning a few images in batches of 8 must not move the moving mean/variance (a real run lost
    # 0.04 Dice that way). Every batch norm of the model is checked: 2 statistics each.
    norms = [x for x in trained[1].layers if x.__class__.__name__ == "BatchNormalization"]
    qat = exported[1]["qat"]
    assert len(norms) == 10 and qat["bn_statistics"] == 2 * len(norms)
    assert qat["bn_statistics_drift"] == 0.0
    assert qat["images"] == 8 and len(qat["loss"]) == 1


def test_mixed_precision_model_exports(trained, synthetic_data, tmp_path):
    import keras

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = unet.build_unet(size=SIZE, filters=4, depth=2)
    finally:
        keras.config.set_dtype_policy("float32")
    mixed.set_weights(trained[1].get_weights())
    path = str(tmp_path / "mixed.keras")
    mixed.save(path)
    report = export.export(path, synthetic_data, str(tmp_path / "out"), quantize=(), threads=(1,),
                           calibration=4, bench_runs=1, progress=False, onnx=False)
    assert report["rebuilt_float32_from_mixed_precision"]
    assert report["onnx"] is None and not (tmp_path / "out" / "model.onnx").exists()  # --no-onnx
    assert report["tflite"]["float32"]["dice_vs_keras"] >= 0.95  # vs the float32 rebuild: same weights
    _, inp, _, _ = export.tflite_info(str(tmp_path / "out" / "model_float32.tflite"))
    assert inp["dtype"] == np.float32


def test_failure_keeps_previous_export(trained, synthetic_data, tmp_path, monkeypatch):
    out = tmp_path / "export"
    out.mkdir()
    (out / "previous.txt").write_text("keep me")

    def broken(path, kind, *args):
        raise export.failed(os.path.basename(path), "simulated check failure")

    monkeypatch.setattr(export, "check_tflite", broken)  # fails after every file has been written
    with pytest.raises(export.common.Error, match="simulated"):
        export.export(trained[0], synthetic_data, str(out), quantize=("int8",), threads=(1,),
                      calibration=4, bench_runs=1, progress=False)
    assert os.listdir(tmp_path) == ["export"] and os.listdir(out) == ["previous.txt"]


def test_the_step_forms_export_and_keep_int8_parity(train_unet, synthetic_data, tmp_path):
    # --upsample matmul / --pool reshape are other graphs (Dense + Reshape/Permute, reshape + max):
    # export's own checks must still pass on them (float32 within 1e-4 of Keras, int8 within its bound).
    model = train_unet(SIZE, filters=4, depth=2, upsample="matmul", pool="reshape")
    model.save(tmp_path / "variant.keras")
    report = export.export(str(tmp_path / "variant.keras"), synthetic_data, str(tmp_path / "export"),
                           quantize=("int8",), threads=(1,), calibration=20, bench_runs=1, progress=False)
    ops = set(report["tflite"]["float32"]["ops"])
    assert {"FULLY_CONNECTED", "TRANSPOSE", "REDUCE_MAX"} <= ops and "TRANSPOSE_CONV" not in ops
    int8 = report["tflite"]["int8"]
    assert int8["mean_abs_diff_vs_keras"] <= export.INT8_MEAN_ATOL and int8["dice_vs_keras"] >= 0.95
    assert int8["input"]["dtype"] == "uint8" and int8["float32_tensors"] == 0


def one_line_error(capsys, argv):
    code, _, err = run_cli(export, argv, capsys)
    err = err.strip()
    assert code != 0 and err.startswith("error: ") and "\n" not in err
    return err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys, trained):
    import keras

    # (a missing file is test_cli_missing_file_exit_code's case, through the real command line)
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip")
    assert "cannot load" in one_line_error(capsys, ["--weights", str(corrupt)])
    classifier = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    classifier.save(tmp_path / "classifier.keras")
    assert "not a segmentation model" in one_line_error(capsys, ["--weights", str(tmp_path / "classifier.keras")])
    assert "unknown" in one_line_error(capsys, ["--weights", trained[0], "--quantize", "int4"])
    assert not (tmp_path / "export").exists()


def test_cli_missing_file_exit_code(tmp_path):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "export.py")
    proc = subprocess.run([sys.executable, script, "--weights", str(tmp_path / "x.keras"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2  # bad input
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "x.keras: model file not found" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@settings(max_examples=25, deadline=None)
@given(old=st.sets(st.sampled_from("abcdef"), max_size=4), new=st.sets(st.sampled_from("cdefgh"), min_size=1))
def test_publish_swaps_whole_folders(tmp_path_factory, old, new):
    root = tmp_path_factory.mktemp("pub")
    out, work = root / "export", root / "work"
    work.mkdir()
    for name in new:
        (work / name).write_text("new")
    if old:
        out.mkdir()
        for name in old:
            (out / name).write_text("old")
    export.publish(str(work), str(out))
    assert sorted(os.listdir(out)) == sorted(new)
    assert all((out / name).read_text() == "new" for name in new)
    assert os.listdir(root) == ["export"]
