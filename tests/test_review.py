"""Knowing when it is wrong (issue 33): extras/review.py (the uncertainty, the review threshold, the
AUROC and review figures evaluate.py reports), extras/risk_coverage.py, and where the threshold
comes from (run.json, models/skin_unet.json, --review-threshold, the default)."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
from conftest import MANY, run_cli
from hypothesis import assume, given, strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

import evaluate
import inference
import metrics

maps = arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12)),
              elements=st.floats(0, 1, width=32))
thresholds = st.floats(0.01, 0.99)


# ---------------------------------------------------------------------------- the measure

@MANY
@given(arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 12))), thresholds)
def test_a_perfectly_confident_map_has_uncertainty_zero(mask, threshold):
    assert metrics.uncertainty(mask.astype(np.float32), threshold) == 0.0


@MANY
@given(maps, thresholds)
def test_uncertainty_is_in_0_1_and_one_minus_the_soft_jaccard(prob, threshold):
    u = metrics.uncertainty(prob, threshold)
    assert 0.0 <= u < 1.0
    p = prob.astype(np.float64)
    mask = p > threshold
    soft = (np.minimum(p, mask).sum() + 1) / (np.maximum(p, mask).sum() + 1)  # fuzzy-set Jaccard
    assert u == pytest.approx(1 - soft, abs=1e-9)
    # A map that is surer (each pixel pushed toward its side of the threshold) is never less sure.
    surer = np.where(mask, np.maximum(p, (1 + p) / 2), p / 2)
    assert metrics.uncertainty(surer, threshold) <= u + 1e-12


@MANY
@given(maps, thresholds, st.integers(0, 3), st.booleans())
def test_uncertainty_does_not_change_under_the_tta_symmetries(prob, threshold, k, flip):
    moved = np.rot90(prob, k)
    moved = moved[:, ::-1] if flip else moved
    assert metrics.uncertainty(moved, threshold) == pytest.approx(
        metrics.uncertainty(prob, threshold), abs=1e-12)


@MANY
@given(st.lists(maps, min_size=1, max_size=4), thresholds)
def test_batched_equals_per_map(probs, threshold):
    assume(len({p.shape for p in probs}) == 1)
    batch = metrics.uncertainty(np.stack(probs), threshold)
    assert np.allclose(batch, [metrics.uncertainty(p, threshold) for p in probs], atol=1e-12)


@MANY
@given(st.lists(st.floats(0, 1), min_size=1, max_size=60), st.floats(0, 0.5))
def test_the_chosen_threshold_is_the_lowest_that_flags_at_most_the_share(values, share):
    t = metrics.choose_review_threshold(values, share)
    values = np.array(values)
    assert t in values and np.mean(values > t) <= share
    lower = values[values < t]
    if len(lower):  # any lower candidate flags too many
        assert np.mean(values > lower.max()) > share
    assert metrics.choose_review_threshold([], share) is None


# ---------------------------------------------------------------------------- evaluate's figures

def brute_force_auroc(scores, positives):
    pairs = [(p, n) for p, yp in zip(scores, positives) if yp for n, yn in zip(scores, positives) if not yn]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


@MANY
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 1.0]), st.booleans()),
                min_size=2, max_size=40))
def test_auroc_agrees_with_a_brute_force_pair_count(cases):
    scores, positives = zip(*cases)
    if all(positives) or not any(positives):
        assert metrics.auroc(scores, positives) is None
    else:
        assert metrics.auroc(scores, positives) == pytest.approx(brute_force_auroc(scores, positives))


def _rows(jaccards, uncertainties, threshold):
    return [{"image_id": f"i{k}", "jaccard": j, "dice": 2 * j / (1 + j),
             "threshold_jaccard": j if j >= 0.65 else 0.0, "uncertainty": u, "review": int(u > threshold)}
            for k, (j, u) in enumerate(zip(jaccards, uncertainties))]


def test_review_figures_by_hand():
    # Two failures (0.3, 0.6); the flag (over 0.5) catches one of them and one good photo.
    rows = _rows([0.9, 0.8, 0.3, 0.6, 0.95], [0.1, 0.6, 0.9, 0.4, 0.05], threshold=0.5)
    r = evaluate.review_figures(rows, 0.5)
    assert r["failures"] == 2 and r["caught"] == 0.5 and r["flagged"] == 0.4 and r["kept"] == 3
    assert r["kept_threshold_jaccard"] == pytest.approx((0.9 + 0.0 + 0.95) / 3)
    assert r["kept_dice"] == pytest.approx(np.mean([2 * j / (1 + j) for j in (0.9, 0.6, 0.95)]))
    assert r["auroc"] == pytest.approx(brute_force_auroc([0.1, 0.6, 0.9, 0.4, 0.05],
                                                         [False, False, True, True, False]))
    none = evaluate.review_figures(_rows([0.9, 0.8], [0.1, 0.2], 0.5), 0.5)
    assert none["failures"] == 0 and none["caught"] is None and none["auroc"] is None
    assert "n/a" in evaluate.review_line({**none, "source": "the default"})


@MANY
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=30))
def test_risk_coverage_curve_is_the_mean_of_what_is_kept(cases):
    rows = _rows(*zip(*cases), threshold=0.5)
    share, kept = evaluate.risk_curve(rows, "jaccard")
    order = sorted(rows, key=lambda r: -r["uncertainty"])
    assert len(share) == len(rows) and share[0] == 0
    for k in range(len(rows)):
        assert share[k] == pytest.approx(k / len(rows))
        assert kept[k] == pytest.approx(np.mean([r["jaccard"] for r in order[k:]]))


def test_risk_coverage_png(tmp_path):
    rows = _rows([0.9, 0.8, 0.3, 0.6, 0.95], [0.1, 0.6, 0.9, 0.4, 0.05], threshold=0.5)
    evaluate.write_risk_coverage(str(tmp_path / "rc.png"), rows, 0.5)
    with Image.open(tmp_path / "rc.png") as image:
        assert image.format == "PNG" and image.width > 300
    assert os.listdir(tmp_path) == ["rc.png"]


# ---------------------------------------------------------------------------- where the threshold comes from

def test_threshold_from_run_json_the_flag_or_the_default(tiny_model, tmp_path):
    weights = tmp_path / "run" / "best.keras"
    weights.parent.mkdir()
    shutil.copy(tiny_model["paths"]["keras"], weights)
    p = inference.load_predictor(str(weights))
    assert (p.review_threshold, p.review_source) == (metrics.REVIEW_THRESHOLD, "the default: the model stores none")
    (weights.parent / "run.json").write_text(json.dumps({"size": 32, "review_threshold": 0.31}))
    p = inference.load_predictor(str(weights))
    assert (p.review_threshold, p.review_source) == (0.31, "from run.json")
    p = inference.load_predictor(str(weights), review_threshold=0.05)
    assert (p.review_threshold, p.review_source) == (0.05, "--review-threshold")
    # The released model's is models/skin_unet.json, chosen on val as train.py chooses one.
    released = inference.load_predictor()
    with open(os.path.join(os.path.dirname(inference.RELEASED), "skin_unet.json")) as f:
        assert released.review_threshold == json.load(f)["review_threshold"]
    assert released.review_source == "from skin_unet.json"


def test_evaluate_summary_auroc_matches_brute_force_on_a_split_with_both(synthetic_data):
    """A made-up model that gets two photos in three right, confidently, and the rest wrong, each
    with its own doubt: the split has both kinds, so the summary's AUROC must equal the brute force
    over metrics.csv's own rows (not skipped as when every photo fails)."""
    import imaging
    import layouts

    pairs = layouts.find_pairs(synthetic_data)[0]
    truths = {}
    for i, pair in enumerate(pairs):
        image = evaluate._decode(pair, 32)[0].image
        truth = imaging.resize_mask(imaging.load_mask(pair.mask), (32, 32))
        doubt = 0.05 + 0.4 * ((i * 7) % 11) / 11  # a different uncertainty for every photo
        truths[image.tobytes()] = np.where(truth if i % 3 else ~truth, 1 - doubt, doubt)

    def run(x):
        return np.stack([truths[image.tobytes()] for image in x]).astype(np.float32)

    predictor = inference.Predictor("made-up", "keras", 32, run, review_threshold=0.3)
    summary = evaluate.evaluate(predictor, pairs, progress=False)
    failed = [row["jaccard"] < metrics.JACCARD_CUTOFF for row in summary["rows"]]
    assert 0 < sum(failed) < len(failed)
    u = [row["uncertainty"] for row in summary["rows"]]
    assert summary["review"]["auroc"] == pytest.approx(brute_force_auroc(u, failed), abs=1e-9)
    assert summary["review"]["failures"] == sum(failed)


def test_evaluate_reports_the_flag_and_the_cli_checks_it(tiny_model, synthetic_data, tmp_path, capsys):
    weights = tiny_model["paths"]["keras"]
    out = tmp_path / "eval"
    code, stdout, err = run_cli(evaluate, ["--weights", weights, "--data", synthetic_data, "--split", "all",
                                           "--out", str(out), "--review-threshold", "0.3", "--no-progress"], capsys)
    assert code == 0, err
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    r = summary["review"]
    assert r["threshold"] == 0.3 and r["source"] == "--review-threshold"
    assert all(row["review"] == str(int(float(row["uncertainty"]) > 0.3)) for row in rows)
    assert r["flagged"] == pytest.approx(np.mean([row["review"] == "1" for row in rows]))
    assert "review (uncertainty > 0.300, --review-threshold): flags" in stdout
    with Image.open(out / "risk_coverage.png") as image:
        assert image.format == "PNG"
    code, _, err = run_cli(evaluate, ["--weights", weights, "--data", synthetic_data, "--review-threshold", "1.5"], capsys)
    assert code == 2 and err.strip() == "error: --review-threshold 1.5: must be within [0, 1]"
