"""The released model in models/ (issue 32): it loads in a bare Keras session, and predict.py,
evaluate.py and app.py use it when --weights is left out, with no training first; a missing or
damaged file is one line saying how to restore it. Nothing here reads ../shared."""
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli
from PIL import Image

import app
import evaluate
import inference
import predict
from extras import synthetic

MODELS = os.path.join(ROOT, "models")


def test_the_released_files_load_in_a_bare_session(tmp_path):
    """No import of this repository, no flag, no other file: Keras alone, then LiteRT alone."""
    code = ("import keras, numpy as np\n"
            "m = keras.models.load_model(r'{}', compile=False)\n"
            "y = m.predict(np.zeros((1, *m.input_shape[1:]), 'float32'), verbose=0)\n"
            "print(m.input_shape, y.shape, float(y.min()) >= 0, float(y.max()) <= 1)\n"
            "from ai_edge_litert.interpreter import Interpreter\n"
            "i = Interpreter(model_path=r'{}'); i.allocate_tensors()\n"
            "d = i.get_input_details()[0]; print(d['dtype'].__name__, d['shape'].tolist())\n")
    code = code.format(inference.RELEASED, os.path.join(MODELS, "skin_unet_int8.tflite"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    keras_line, tflite_line = result.stdout.strip().splitlines()[-2:]
    assert keras_line == "(None, 128, 128, 3) (1, 128, 128, 1) True True"
    assert tflite_line == "uint8 [1, 128, 128, 3]"
    assert os.path.getsize(inference.RELEASED) < 10 * 2**20  # the card's promise: under 10 MB


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    images, _ = synthetic.make_synthetic(2, seed=5, size_wh=(300, 200))
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"photo_{i}.jpg", quality=92)
    return str(folder)


def test_predict_without_weights_uses_the_released_model(photos, tmp_path, capsys):
    out = tmp_path / "masks"
    code, _, err = run_cli(predict, ["--data", photos, "--out", str(out), "--no-progress"], capsys)
    assert code == 0 and f"model {inference.RELEASED} (keras, 128px)" in err
    mask = np.asarray(Image.open(out / "photo_0_segmentation.png"))
    assert mask.shape == (200, 300) and set(np.unique(mask)) <= {0, 255}
    assert 0 < (mask > 0).mean() < 1  # a trained model finds the lesion, not all or nothing


def test_evaluate_without_weights_scores_the_released_model(synthetic_data, tmp_path, capsys):
    code, out, err = run_cli(evaluate, ["--data", synthetic_data, "--split", "all", "--out",
                                        str(tmp_path / "eval"), "--no-progress"], capsys)
    assert code == 0 and f"model {inference.RELEASED}" in err
    assert (tmp_path / "eval" / "summary.json").exists()


def test_app_without_weights_analyses_a_photo_with_the_released_model(photos, tmp_path):
    args = app.parse_args([])
    assert args.weights is None  # the default: load_predictor(None) is the released model
    predictor = app.LockedPredictor(inference.load_predictor(args.weights, args.size,
                                                           args.review_threshold))
    assert predictor.path == inference.RELEASED and predictor.size == 128
    result = app.analyse(predictor, os.path.join(photos, "photo_0.jpg"), 0.5,
                         app.Photos(str(tmp_path / "app")))
    assert result[4] is not None  # a state: the photo was analysed
    # with the review threshold stored with the release (models/skin_unet.json)
    assert result[4]["review_at"] == inference.read_run_json(inference.RELEASED)["review_threshold"]
    assert "Uncertainty: " in result[2]


@pytest.mark.parametrize("damage", ["missing", "corrupt", "corrupt threshold file"])
def test_a_missing_or_damaged_release_is_one_line_saying_how_to_restore_it(
        damage, photos, tmp_path, monkeypatch, capsys):
    import shutil
    fake = tmp_path / "models" / "skin_unet.keras"
    fake.parent.mkdir()
    named = fake
    if damage == "corrupt":
        fake.write_bytes(b"PK\x03\x04 not the model any more")
    if damage == "corrupt threshold file":  # models/skin_unet.json, the review threshold
        shutil.copyfile(inference.RELEASED, fake)
        named = tmp_path / "models" / "skin_unet.json"
        named.write_text('{"review_threshold": 0.2')
    monkeypatch.setattr(inference, "RELEASED", str(fake))
    code, _, err = run_cli(predict, ["--data", photos, "--out", str(tmp_path / "m")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {named}: the released model cannot be used: restore it "
                               "with `git checkout models/` (")


def test_the_released_pair_flags_by_one_threshold():
    """The int8 file reads skin_unet.json, the .keras file's: the same photos are flagged."""
    released = inference.load_predictor()
    int8 = inference.load_predictor(os.path.join(MODELS, "skin_unet_int8.tflite"))
    assert int8.review_threshold == released.review_threshold
    assert int8.review_source == released.review_source == "from skin_unet.json"


def test_the_release_reads_no_run_json_beside_or_above_it(tmp_path, monkeypatch):
    """A quick start leaves a run.json in the repository, one folder above models/: it is another
    run's, and must not lend the released model its data, split or size."""
    import json
    import shutil
    fake = tmp_path / "models" / "skin_unet.keras"
    fake.parent.mkdir()
    shutil.copyfile(inference.RELEASED, fake)
    (tmp_path / "run.json").write_text(json.dumps({"size": 64, "data": "/nowhere"}))
    monkeypatch.setattr(inference, "RELEASED", str(fake))
    assert inference.read_run_json(str(fake)) == {}
    assert inference.load_predictor(str(fake)).size == 128
