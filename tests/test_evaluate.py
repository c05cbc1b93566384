"""evaluate.py: metrics against a brute-force reference and the official ISIC scorer, the three
model formats through one code path, and the command line end to end (its grid_*.png included;
the grids' picker, extras/grids.py, is tests/test_grids.py's)."""

import csv
import json
import os

import numpy as np
import pytest
from conftest import MANY, run_cli
from hypothesis import given, settings, strategies as st
from isic_challenge_scoring import metrics as official
from isic_challenge_scoring.confusion import create_binary_confusion_matrix
from isic_challenge_scoring.segmentation import SegmentationScore
from PIL import Image

import evaluate
import imaging
import inference
import layouts
import metrics

METRICS = metrics.METRICS


# ---------------------------------------------------------------------------- mask strategies

@st.composite
def mask_pairs(draw, max_side=12):
    """Two masks of one random (often non-square) shape; each empty, full, a single pixel or
    random, so the zero-denominator cases come up all the time."""
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def one():
        kind = draw(st.sampled_from(["empty", "full", "pixel", "random", "random"]))
        if kind == "empty":
            return np.zeros((h, w), bool)
        if kind == "full":
            return np.ones((h, w), bool)
        if kind == "pixel":
            m = np.zeros((h, w), bool)
            m[rng.integers(h), rng.integers(w)] = True
            return m
        return rng.random((h, w)) < rng.random()

    return one(), one()


def brute_force(truth, pred):
    """The metrics written from the definitions with Python sets of pixel coordinates."""
    pixels = {(i, j) for i in range(truth.shape[0]) for j in range(truth.shape[1])}
    t = {p for p in pixels if truth[p]}
    q = {p for p in pixels if pred[p]}
    tp, fp, fn, tn = len(t & q), len(q - t), len(t - q), len(pixels - (t | q))

    def ratio(a, b):
        return 1.0 if b == 0 else a / b

    jaccard = ratio(len(t & q), len(t | q))
    return {"dice": ratio(2 * len(t & q), len(t) + len(q)), "jaccard": jaccard,
            "threshold_jaccard": jaccard if jaccard >= 0.65 else 0.0,
            "sensitivity": ratio(tp, len(t)), "specificity": ratio(tn, len(pixels - t)),
            "accuracy": (tp + tn) / len(pixels)}, (tp, fp, fn, tn)


def official_scores(truth, pred):
    cm = create_binary_confusion_matrix(truth, pred)
    return {"dice": official.binary_dice(cm), "jaccard": official.binary_jaccard(cm),
            "threshold_jaccard": official.binary_threshold_jaccard(cm, threshold=0.65),
            "sensitivity": official.binary_sensitivity(cm),
            "specificity": official.binary_specificity(cm),
            "accuracy": official.binary_accuracy(cm)}


# ---------------------------------------------------------------------------- metric properties

@MANY
@given(mask_pairs())
def test_metrics_equal_brute_force_and_official_scorer(masks):
    truth, pred = masks
    ours = metrics.image_scores(truth, pred)
    reference, counts = brute_force(truth, pred)
    assert tuple(int(c) for c in metrics.confusion(truth, pred)) == counts
    theirs = official_scores(truth, pred)
    for k in METRICS:
        assert ours[k] == pytest.approx(reference[k], abs=1e-9), k
        assert ours[k] == pytest.approx(theirs[k], abs=1e-6), k
        assert 0.0 <= ours[k] <= 1.0


@MANY
@given(mask_pairs())
def test_dice_jaccard_relation_symmetry_and_complement(masks):
    truth, pred = masks
    s = metrics.image_scores(truth, pred)
    assert s["dice"] == pytest.approx(2 * s["jaccard"] / (1 + s["jaccard"]), abs=1e-12)
    swapped = metrics.image_scores(pred, truth)
    for k in ("dice", "jaccard", "threshold_jaccard", "accuracy"):
        assert swapped[k] == s[k]
    # Swapping the roles of foreground and background turns sensitivity into specificity.
    flipped = metrics.image_scores(~truth, ~pred)
    assert flipped["sensitivity"] == s["specificity"]
    assert flipped["specificity"] == s["sensitivity"]
    assert flipped["accuracy"] == s["accuracy"]


@MANY
@given(st.lists(mask_pairs(max_side=6), min_size=1, max_size=5).filter(
    lambda ms: len({m[0].shape for m in ms}) == 1))
def test_batched_equals_per_image(pairs):
    truth = np.stack([t for t, _ in pairs])
    pred = np.stack([p for _, p in pairs])
    batched = metrics.image_scores(truth, pred)
    for i, (t, p) in enumerate(pairs):
        single = metrics.image_scores(t, p)
        for k in METRICS:
            assert batched[k][i] == single[k]


@MANY
@given(mask_pairs())
def test_invariant_to_array_encoding(masks):
    truth, pred = masks
    expected = metrics.image_scores(truth, pred)
    for encode in (lambda m: m.astype(np.uint8), lambda m: m.astype(np.uint8) * 255,
                   lambda m: m.astype(np.uint16) * 65535):
        assert metrics.image_scores(encode(truth), encode(pred)) == expected


@settings(max_examples=25, deadline=None)
@given(mask_pairs())
def test_invariant_to_file_encoding(tmp_path_factory, masks):
    truth, pred = masks
    expected = metrics.image_scores(truth, pred)
    folder = tmp_path_factory.mktemp("enc")
    files = {"bool": Image.fromarray(truth), "01": Image.fromarray(truth.astype(np.uint8)),
             "0255": Image.fromarray(truth.astype(np.uint8) * 255),
             "16bit": Image.fromarray(truth.astype(np.uint16) * 65535)}
    for name, image in files.items():
        path = folder / f"{name}.png"
        image.save(path)
        loaded = imaging.load_mask(str(path))
        assert loaded.dtype == bool and loaded.shape == truth.shape, name
        assert metrics.image_scores(loaded, pred) == expected, name


@MANY
@given(st.lists(mask_pairs(max_side=8), min_size=1, max_size=8), st.randoms())
def test_macro_average_is_order_invariant_and_is_the_mean(pairs, rnd):
    rows = []
    for i, (t, p) in enumerate(pairs):
        counts = metrics.confusion(t, p)
        rows.append({"image_id": f"ISIC_{i:07d}", **metrics.image_scores(t, p),
                     **dict(zip(("tp", "fp", "fn", "tn"), counts))})
    summary = evaluate.summarize(rows)
    shuffled = rows[:]
    rnd.shuffle(shuffled)
    other = evaluate.summarize(shuffled)
    for k in METRICS:
        assert other[k] == pytest.approx(summary[k], abs=1e-12)
        assert summary[k] == pytest.approx(np.mean([r[k] for r in rows]), abs=1e-12)
    assert other["pooled"] == pytest.approx(summary["pooled"], abs=1e-12)
    # Pooled = the metric of all pixels together (images side by side).
    flat_t = np.concatenate([t.ravel() for t, _ in pairs])[None]
    flat_p = np.concatenate([p.ravel() for _, p in pairs])[None]
    assert summary["pooled"]["dice"] == pytest.approx(metrics.image_scores(flat_t, flat_p)["dice"])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_load_mask_matches_official_binarization(tmp_path_factory, h, w, seed):
    """imaging.load_mask binarizes greyscale exactly as the official scorer (> 128), for any 8-bit
    file whose maximum is above 1 (0/1 masks are our one extension: read as > 0)."""
    rng = np.random.default_rng(seed)
    values = rng.choice([0, 127, 128, 129, 255, *range(256)], size=(h, w)).astype(np.uint8)
    values.flat[0] = rng.integers(2, 256) if values.max() <= 1 else values.flat[0]
    path = tmp_path_factory.mktemp("bin") / "ISIC_0000000_segmentation.png"
    Image.fromarray(values, mode="L").save(path)
    from isic_challenge_scoring.load_image import load_segmentation_image
    assert np.array_equal(imaging.load_mask(str(path)), load_segmentation_image(path) > 128)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_official_segmentation_score_on_files(tmp_path):
    """Our summary of mask files equals SegmentationScore.from_dir of the official package."""
    rng = np.random.default_rng(1)
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    rows = []
    shapes = [(7, 11), (1, 1), (16, 9), (5, 5), (30, 20), (3, 40)]
    for i, (h, w) in enumerate(shapes):
        truth = rng.random((h, w)) < [0.0, 1.0, 0.3, 0.5, 0.6, 0.2][i]
        pred = truth ^ (rng.random((h, w)) < 0.15) if i != 3 else np.zeros((h, w), bool)
        image_id = f"ISIC_{i:07d}"
        Image.fromarray(truth.astype(np.uint8) * 255).save(truth_dir / f"{image_id}_segmentation.png")
        imaging.save_mask_png(str(pred_dir), image_id, pred)
        t = imaging.load_mask(str(truth_dir / f"{image_id}_segmentation.png"))
        p = imaging.load_mask(str(pred_dir / f"{image_id}_segmentation.png"))
        counts = metrics.confusion(t, p)
        rows.append({"image_id": image_id, **metrics.scores_from_confusion(*counts),
                     **dict(zip(("tp", "fp", "fn", "tn"), counts))})
    ours = evaluate.summarize(rows)
    theirs = SegmentationScore.from_dir(truth_dir, pred_dir).macro_average
    for k in METRICS:
        assert ours[k] == pytest.approx(theirs[k], abs=1e-6), k


# ---------------------------------------------------------------------------- resizing back

@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12), st.integers(0, 40), st.integers(0, 40), st.integers(0, 2**32 - 1))
def test_resize_then_threshold_equals_nearest_except_near_boundary(s, extra_h, extra_w, seed):
    # Native masks are larger than the model input (upsampling). Probabilities keep clear of the
    # threshold so float rounding cannot flip a pixel whose neighbourhood is all on one side.
    rng = np.random.default_rng(seed)
    prob = np.where(rng.random((s, s)) < 0.5, rng.uniform(0.0, 0.45, (s, s)),
                    rng.uniform(0.55, 1.0, (s, s))).astype(np.float32)
    h, w = s + extra_h, s + extra_w
    resized = imaging.resize_prob(prob, (h, w)) > 0.5
    small = prob > 0.5
    rows = np.minimum((np.arange(h) + 0.5) * s / h, s - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) * s / w, s - 1).astype(int)
    nearest = small[rows][:, cols]
    # The one-(model-)pixel band: source pixels with a differently thresholded 8-neighbour.
    padded = np.pad(small, 1, mode="edge")
    windows = [padded[1 + dy:1 + dy + s, 1 + dx:1 + dx + s] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    band = np.any([win != small for win in windows], axis=0)[rows][:, cols]
    assert np.array_equal(resized[~band], nearest[~band])


# ---------------------------------------------------------------------------- Keras metric

def test_keras_metrics_agree_with_image_scores():
    keras = pytest.importorskip("keras")
    unet = pytest.importorskip("unet")
    rng = np.random.default_rng(3)
    truth = rng.random((6, 16, 16)) < rng.random((6, 1, 1))
    truth[0] = False  # empty truth, empty-ish prediction: the zero-denominator case
    probs = rng.random((6, 16, 16)).astype(np.float32)
    probs[0] = 0.1
    probs[1] = 0.9   # full prediction
    probs[2, :4] = 0.5  # exactly the threshold: both sides count only prob > 0.5 as lesion
    expected = metrics.image_scores(truth, probs > 0.5)
    for cls, key in ((unet.DiceScore, "dice"), (unet.IoUScore, "jaccard")):
        metric = cls()
        metric.update_state(keras.ops.convert_to_tensor(truth[..., None].astype("float32")),
                            keras.ops.convert_to_tensor(probs[..., None]))
        assert float(metric.result()) == pytest.approx(expected[key].mean(), abs=1e-5), key


# ---------------------------------------------------------------------------- test-time augmentation

def test_tta_averages_identity_and_flips():
    ramp = np.add.outer(np.arange(8), 10 * np.arange(8)).astype(np.float32) / 80
    # A model that ignores its input and outputs a fixed ramp shows each flip being undone.
    fixed = inference.Predictor("ramp", "fake", 8, lambda x: np.repeat(ramp[None], len(x), 0))
    images = np.zeros((2, 8, 8, 3), np.uint8)
    expected = (ramp + ramp[:, ::-1] + ramp[::-1]) / 3
    assert np.allclose(inference.predict_probs(fixed, images, tta=True), expected)
    # A pointwise model commutes with flips: TTA changes nothing.
    pointwise = inference.Predictor("mean", "fake", 8, lambda x: x.mean(-1) / 255)
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    assert np.allclose(inference.predict_probs(pointwise, images, tta=True),
                       inference.predict_probs(pointwise, images))


# ---------------------------------------------------------------------------- models end to end

@pytest.fixture(scope="module")
def models(tiny_model):
    """conftest's tiny model in all four formats: (paths, images, Keras probabilities)."""
    return tiny_model["paths"], tiny_model["images"], tiny_model["expected"]


def test_every_model_format_predicts_the_same(models):
    paths, images, expected = models
    for kind, atol in (("keras", 1e-6), ("saved_model", 1e-5), ("tflite", 1e-4), ("int8", 0.06)):
        predictor = inference.load_predictor(paths[kind])
        assert predictor.size == 32
        probs = predictor.predict(images)
        assert probs.shape == (3, 32, 32) and probs.dtype == np.float32
        assert np.abs(probs - expected).max() <= atol, kind
    predictor = inference.load_predictor(paths["keras"])
    tta = inference.predict_probs(predictor, images, tta=True)
    views = (predictor.predict(images) + predictor.predict(images[:, :, ::-1])[:, :, ::-1]
             + predictor.predict(images[:, ::-1])[:, ::-1]) / 3  # identity, h-flip, v-flip
    np.testing.assert_allclose(tta, views, atol=1e-6)


def _run(argv, capsys):
    return run_cli(evaluate, [*argv, "--no-progress"], capsys)


def test_cli_end_to_end_matches_official_scorer(models, synthetic_data, tmp_path, capsys):
    paths, _, _ = models
    out, masks = tmp_path / "eval", tmp_path / "masks"
    code, stdout, _ = _run(["--weights", paths["keras"], "--data", synthetic_data, "--split", "all",
                            "--out", str(out), "--save-masks", str(masks)], capsys)
    assert code == 0 and "dice" in stdout and "pooled dice" in stdout
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and set(METRICS) <= set(rows[0])
    assert all(r["height"] == "96" and r["width"] == "128" for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    for k in METRICS:
        assert summary[k] == pytest.approx(np.mean([float(r[k]) for r in rows]), abs=1e-6)
    assert summary["threshold"] == 0.5 and summary["split"] == "all" and summary["images"] == 24
    assert {"pooled", "median", "worst", "model", "data"} <= set(summary)
    for name in ("grid_best.png", "grid_worst.png", "grid_random.png"):
        with Image.open(out / name) as grid:
            assert grid.width == 4 * evaluate.TILE and grid.height > evaluate.TILE
    saved = sorted(os.listdir(masks))
    assert saved == sorted(f"{r['image_id']}_segmentation.png" for r in rows)
    with Image.open(masks / saved[0]) as m:
        assert m.mode == "L" and m.size == (128, 96)
        assert set(np.unique(np.asarray(m))) <= {0, 255}
    # The official scorer, given our submission-format masks, agrees with our summary.
    truth = os.path.join(synthetic_data, "ISIC2018_Task1_Training_GroundTruth")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official_summary = SegmentationScore.from_dir(
            __import__("pathlib").Path(truth), masks).macro_average
    for k in METRICS:
        assert summary[k] == pytest.approx(official_summary[k], abs=1e-6), k


@pytest.mark.slow
def test_cli_split_follows_run_json_and_formats_share_one_path(models, synthetic_data, tmp_path,
                                                                 capsys):
    paths, _, _ = models
    # run.json beside the weights: its split fractions (and data) define the default val split.
    folder = tmp_path / "run"
    folder.mkdir()
    weights = folder / "best.keras"
    weights.write_bytes(open(paths["keras"], "rb").read())
    (folder / "run.json").write_text(json.dumps({"data": synthetic_data, "val_fraction": 0.5,
                                                 "test_fraction": 0.1, "size": 32}))
    code, _, _ = _run(["--weights", str(weights), "--out", str(tmp_path / "a")], capsys)
    assert code == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    pairs, _, _ = layouts.find_pairs(synthetic_data, 0.5, 0.1)
    assert summary["images"] == sum(p.split == "val" for p in pairs) > 1
    assert summary["val_fraction"] == 0.5 and summary["split"] == "val"
    # The same split through the SavedModel and both .tflite files.
    scores = {}
    for kind in ("keras", "saved_model", "tflite", "int8"):
        code, _, _ = _run(["--weights", paths[kind], "--data", synthetic_data, "--split", "test",
                           "--out", str(tmp_path / kind), "--tta"], capsys)
        assert code == 0, kind
        scores[kind] = json.loads((tmp_path / kind / "summary.json").read_text())
        assert scores[kind]["tta"] is True and scores[kind]["images"] == 3
    assert scores["saved_model"]["dice"] == pytest.approx(scores["keras"]["dice"], abs=0.02)
    assert scores["tflite"]["dice"] == pytest.approx(scores["keras"]["dice"], abs=0.02)


@pytest.fixture(scope="module")
def garbage(tmp_path_factory):
    """A .keras that is no zip, and a folder that is no SavedModel."""
    folder = tmp_path_factory.mktemp("garbage")
    (folder / "garbage.keras").write_bytes(b"not a zip file")
    (folder / "not_a_model").mkdir()
    (folder / "run.json").write_text('{"size": 32}')  # what sits beside a model, handed over instead of it
    return folder


# Each case its own test (ids), so the first failure does not hide the rest. {keras}: the tiny model.
BAD_INPUTS = {
    "missing model": (["--weights", "{tmp}/missing.keras"], "not found", 2),
    "not a zip": (["--weights", "{garbage}/garbage.keras"], "cannot load", 2),
    "folder without a SavedModel": (["--weights", "{garbage}/not_a_model"], "not a SavedModel", 2),
    "a run.json, not a model": (["--weights", "{garbage}/run.json"], "unknown model format", 2),
    "size that does not match": (["--weights", "{keras}", "--size", "64"], "does not match", 2),
    "missing data": (["--weights", "{keras}", "--data", "{tmp}/nowhere"], "no such folder", 2),
    "threshold out of range": (["--weights", "{keras}", "--threshold", "2"], "threshold", 2),
    # an output folder that cannot be written is a failure of the run, not bad input: 1
    "masks folder is a file": (["--weights", "{keras}", "--split", "test", "--save-masks",
                                "{garbage}/garbage.keras"], "garbage", 1),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_cli_bad_inputs_are_one_line_errors(case, models, garbage, synthetic_data, tmp_path, capsys):
    argv, expected, exit_code = BAD_INPUTS[case]
    argv = [a.format(tmp=tmp_path, garbage=garbage, keras=models[0]["keras"]) for a in argv]
    if "--data" not in argv:
        argv += ["--data", synthetic_data]
    code, _, err = _run([*argv, "--out", str(tmp_path / "e")], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == exit_code and len(lines) == 1 and expected in lines[0], err
    assert "\n" not in lines[0]


def test_size_agnostic_model_needs_a_size_the_unet_takes(synthetic_data, tmp_path, capsys):
    unet = pytest.importorskip("unet")
    anysize = tmp_path / "anysize.keras"
    unet.build_unet(size=None, filters=4).save(anysize)
    code, _, err = _run(["--weights", str(anysize), "--data", synthetic_data, "--size", "40"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:")  # 40 is not a multiple of 16
    code, _, err = _run(["--weights", str(anysize), "--data", synthetic_data, "--size", "32",
                         "--split", "test", "--out", str(tmp_path / "ok")], capsys)
    assert code == 0


def test_bad_image_is_reported_and_skipped(models, synthetic_data, tmp_path, capsys):
    import shutil

    paths, _, _ = models
    root = tmp_path / "data"
    shutil.copytree(synthetic_data, root)
    pairs, _, _ = layouts.find_pairs(str(root))
    broken_image, broken_mask, wrong_size = pairs[0], pairs[1], pairs[2]
    with open(broken_image.image, "r+b") as f:
        f.truncate(200)
    with open(broken_mask.mask, "wb") as f:
        f.write(b"\x89PNG garbage")
    Image.new("L", (50, 40)).save(wrong_size.mask)  # a mask that does not belong to its image
    code, _, err = _run(["--weights", paths["keras"], "--data", str(root), "--split", "all",
                         "--out", str(tmp_path / "e")], capsys)
    assert code == 0
    assert broken_image.image in err and broken_mask.mask in err and wrong_size.mask in err
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["images"] == 21
    assert {p["file"] for p in summary["problems"]} == {broken_image.image, broken_mask.mask,
                                                        wrong_size.mask}
    # Each skipped file is named once, in its line and in its problem (it was once named twice).
    for problem in summary["problems"]:
        assert problem["file"] not in problem["problem"]
        line = next(line for line in err.splitlines() if line.startswith(f"skipped: {problem['file']}: "))
        assert line.count(problem["file"]) == 1, line


@pytest.mark.slow
def test_cli_post_processing_reaches_the_saved_masks(models, synthetic_data, tmp_path, capsys):
    """--post goes through the one prediction path: the masks evaluate.py writes are the raw ones
    with small specks removed (largest) and never smaller after filling (fill)."""
    paths, _, _ = models
    area = {}
    for post in ("none", "fill", "largest"):
        masks = tmp_path / post
        code, _, _ = _run(["--weights", paths["keras"], "--data", synthetic_data, "--split", "all", "--post", post,
                           "--out", str(tmp_path / f"e_{post}"), "--save-masks", str(masks)], capsys)
        assert code == 0
        assert json.loads((tmp_path / f"e_{post}" / "summary.json").read_text())["post"] == post
        area[post] = {f.name: int((np.asarray(Image.open(f)) > 0).sum()) for f in sorted(masks.iterdir())}
    assert all(area["fill"][k] >= area["none"][k] >= area["largest"][k] for k in area["none"])
    code, _, err = _run(["--weights", paths["keras"], "--data", synthetic_data, "--post", "smooth"], capsys)
    assert code == 2 and "--post" in err
