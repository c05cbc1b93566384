"""ONNX, the fourth format (extras/onnx_format.py, extras/formats.py): written from a small trained
U-Net, run by ONNX Runtime behind the one Predictor, held to the Keras model, scored by
evaluate.py, and one line for a file that is not a model."""
import json
import os

import numpy as np
import pytest
from conftest import run_cli

import common
import data
import evaluate
import export
import inference
import predict
from extras import formats

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")


@pytest.fixture(scope="module")
def onnx_model(train_unet, synthetic_data, tmp_path_factory):
    """A 32 px U-Net fitted on the synthetic fixture, saved as .keras and model.onnx, with the
    fixture's images at 32 px and Keras's probabilities for them."""
    model = train_unet(32, 4, 2)
    folder = tmp_path_factory.mktemp("onnx")
    paths = {"keras": str(folder / "model.keras"), "onnx": str(folder / "model.onnx")}
    model.save(paths["keras"])
    export.write_onnx(model, paths["onnx"])
    images = data.load_split(synthetic_data, "all", 32, progress=False).images
    return paths, images, model.predict(images.astype(np.float32), verbose=0)[..., 0]


def test_onnx_runtime_gives_the_keras_probabilities_and_masks(onnx_model):
    paths, images, expected = onnx_model
    predictor = inference.load_predictor(paths["onnx"])
    assert (predictor.kind, predictor.size) == ("onnx", 32)
    probs = predictor.predict(images)
    assert np.abs(probs - expected).max() <= export.ONNX_ATOL
    assert np.array_equal(probs > 0.5, expected > 0.5)
    assert 0 < (expected > 0.5).mean() < 1  # a trained model: masks that can disagree


def test_the_batch_axis_is_dynamic_two_sizes_in_one_session(onnx_model):
    paths, images, expected = onnx_model
    predictor = inference.load_predictor(paths["onnx"])
    one = predictor.predict(images[:1])
    many = predictor.predict(images[:7])  # one session: a batch of 7 after a batch of 1
    assert one.shape == (1, 32, 32) and many.shape == (7, 32, 32)
    assert np.abs(one - expected[:1]).max() <= export.ONNX_ATOL
    assert np.abs(many - expected[:7]).max() <= export.ONNX_ATOL


def test_the_contract_names_and_the_check_report(onnx_model):
    paths, images, expected = onnx_model
    session = formats.onnx_session(paths["onnx"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("image", "tensor(float)", [32, 32, 3])
    assert (out.name, out.shape[1:]) == ("mask", [32, 32, 1])
    assert not isinstance(inp.shape[0], int)  # dynamic batch
    row = export.check_onnx(paths["onnx"], 32, expected, images, threads=(2,), runs=3)
    assert row["mask_pixels_differing"] == 0 and row["max_abs_diff_vs_keras"] <= export.ONNX_ATOL
    assert row["latency_ms"]["2"] > 0 and row["size_mb"] > 0
    # A model that disagrees fails the check, naming the file.
    with pytest.raises(common.Error, match="model.onnx: differs from the Keras model"):
        export.check_onnx(paths["onnx"], 32, 1 - expected, images, runs=1)


def test_evaluate_scores_an_onnx_as_it_scores_the_keras_model(onnx_model, synthetic_data, tmp_path,
                                                             capsys):
    paths, _, _ = onnx_model
    dice = {}
    for kind in ("keras", "onnx"):
        out = tmp_path / kind
        code, _, _ = run_cli(evaluate, ["--weights", paths[kind], "--data", synthetic_data,
                                        "--split", "all", "--out", str(out), "--no-progress"],
                             capsys)
        assert code == 0
        with open(out / "summary.json") as f:
            dice[kind] = json.load(f)["dice"]
    assert dice["onnx"] == pytest.approx(dice["keras"], abs=1e-4)


@pytest.mark.parametrize("content", [b"not a model at all", b""], ids=["garbage", "empty"])
def test_a_corrupt_onnx_is_one_line_naming_it(content, synthetic_data, tmp_path, capsys):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(content)
    code, out, err = run_cli(predict, ["--weights", str(bad), "--data", synthetic_data,
                                       "--out", str(tmp_path / "masks")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: cannot load ONNX model")


def test_a_foreign_onnx_is_one_line(tmp_path):
    """A valid ONNX file that is not an image model: its input is int64."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign",
                              [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 4])])
    path = str(tmp_path / "foreign.onnx")
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(common.Error, match="expected one float32 image") as e:
        inference.load_predictor(path)
    assert e.value.file == path


def test_a_missing_package_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    path = tmp_path / "m.onnx"
    path.write_bytes(b"x")
    with pytest.raises(common.Error, match=r"pip install onnxruntime==\d"):
        inference.load_predictor(str(path))
    assert os.path.exists(path)


def test_export_without_an_onnx_package_stops_first_in_one_line(onnx_model, monkeypatch, tmp_path,
                                                                capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tf2onnx" else find_spec(name, *a))
    out = tmp_path / "export"
    code, _, err = run_cli(export, ["--weights", onnx_model[0]["keras"], "--out", str(out)], capsys)
    assert code == 2 and not out.exists()
    assert err.strip() == ("error: model.onnx: ONNX needs tf2onnx (pip install tf2onnx==1.17.0), "
                           "or --no-onnx")


def test_the_int8_onnx_keeps_the_masks_and_its_float_contract(onnx_model):
    paths, images, expected = onnx_model
    path = export.write_onnx_int8(paths["onnx"], images[:8])
    assert path.endswith("model_int8.onnx")
    predictor = inference.load_predictor(path)  # float32 0..255 in, as the float file
    assert (predictor.kind, predictor.size) == ("onnx", 32)
    row = export.check_onnx_int8(path, 32, expected, images, threads=(1,), runs=2)
    assert row["mean_abs_diff_vs_keras"] <= 0.05 and row["dice_vs_keras"] >= 0.9
    with pytest.raises(common.Error, match="model_int8.onnx: differs from the Keras model"):
        export.check_onnx_int8(path, 32, 1 - expected, images, threads=(1,), runs=1)
