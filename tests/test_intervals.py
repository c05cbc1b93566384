"""evaluate.py's 95 % intervals (a percentile bootstrap over images) and --compare's paired
differences: the properties every interval of a mean has, agreement with a bootstrap written here
from metrics.csv alone, and what is said when too few failures leave nothing to say."""
import csv
import json

import numpy as np
import pytest
from conftest import FAST, run_cli
from hypothesis import given, strategies as st

import evaluate
import metrics

scores = st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=60)


def _rows(values, failures=0):
    """Rows as evaluate() makes them, every metric `values`; the first `failures` fail."""
    return [{**{k: v for k in metrics.METRICS}, "jaccard": 0.1 if i < failures else max(v, 0.7),
             "review": int(i < failures), "uncertainty": 0.9 if i < failures else 0.1 * v}
            for i, v in enumerate(values)]


def _mean_ci(values, **kw):
    return evaluate.bootstrap(len(values), {"m": evaluate.mean_of(values)}, **kw)["m"]


@FAST
@given(scores)
def test_the_interval_holds_the_mean(values):
    lo, hi = _mean_ci(values, resamples=2000)
    assert lo - 1e-12 <= np.mean(values) <= hi + 1e-12 and lo <= hi


@FAST
@given(st.floats(0, 1, allow_nan=False), st.integers(1, 40))
def test_identical_photos_give_one_point(value, n):
    assert _mean_ci([value] * n, resamples=500) == pytest.approx([value, value], abs=1e-12)


@FAST
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=20, max_size=40, unique=True),
       st.sampled_from([4, 9]))
def test_repeating_every_photo_k_times_shrinks_the_interval_by_about_sqrt_k(values, k):
    if np.std(values) < 0.05:  # nearly constant values: the widths are too small to compare
        values = list(np.linspace(0, 1, len(values)))
    once = np.diff(_mean_ci(values))[0]
    repeated = np.diff(_mean_ci(list(np.repeat(values, k))))[0]
    assert repeated / once == pytest.approx(1 / np.sqrt(k), rel=0.15)


def test_paired_difference_of_a_model_with_itself_is_zero_and_a_shift_is_read_off():
    rng = np.random.default_rng(1)
    rows = _rows(rng.uniform(0.5, 1, 80))
    for i, row in enumerate(rows):
        row["image_id"] = f"ISIC_{i}"
    same = evaluate.compare(rows, rows)
    assert same["images"] == 80 and all(v == 0 for v in same["difference"].values())
    assert all(ci == [0.0, 0.0] for ci in same["ci95"].values())
    worse = [{**r, "dice": r["dice"] - 0.05 + rng.normal(0, 0.01)} for r in rows]
    better = evaluate.compare(rows, worse)
    lo, hi = better["ci95"]["dice"]
    assert 0 < lo < better["difference"]["dice"] < hi < 0.1  # the whole interval above zero
    with pytest.raises(evaluate.common.Error, match="no photo in common"):
        evaluate.compare(rows, [{**worse[0], "image_id": "other"}])


def test_review_intervals_are_n_a_with_too_few_failures_and_hold_their_figure_otherwise():
    values = np.linspace(0.7, 1, 60)
    ci, review = evaluate.intervals(_rows(values, failures=evaluate.FEW - 1))
    assert review["caught"] is None and review["auroc"] is None and review["flagged"] is not None
    assert set(ci) == set(metrics.METRICS)
    rows = _rows(values, failures=12)
    rows[0]["uncertainty"] = 0.05  # one failure the flag's number ranks below some successes
    ci, review = evaluate.intervals(rows)
    figures = evaluate.review_figures(rows, 0.5)
    for key in ("flagged", "caught", "auroc"):
        lo, hi = review[key]
        assert lo <= figures[key] <= hi, key
    assert "95% CI" in evaluate.review_line({**figures, "source": "s", "ci95": review})


def test_summary_intervals_agree_with_a_bootstrap_of_metrics_csv(tiny_model, synthetic_data, tmp_path,
                                                                 capsys):
    """The printed and stored intervals against an independent percentile bootstrap (another seed,
    another generator) of the per-photo values in metrics.csv: within 0.005."""
    out = tmp_path / "eval"
    weights = tiny_model["paths"]["keras"]
    code, stdout, err = run_cli(evaluate, ["--weights", weights, "--data", synthetic_data, "--split",
                                           "all", "--out", str(out), "--no-progress",
                                           "--compare", weights], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert summary["bootstrap"]["resamples"] == 10_000 and len(rows) == summary["images"]
    rng = np.random.Generator(np.random.PCG64DXSM(12345))
    for k in metrics.METRICS:
        values = np.array([float(r[k]) for r in rows])
        means = values[rng.integers(0, len(values), (20_000, len(values)))].mean(axis=1)
        expected = np.percentile(means, [2.5, 97.5])
        assert summary["ci95"][k] == pytest.approx(expected, abs=0.005), k
    lo, hi = summary["ci95"]["threshold_jaccard"]
    assert f"thresholded Jaccard {summary['threshold_jaccard']:.3f} (95% CI {lo:.3f}-{hi:.3f})" in stdout
    # --compare with the same model: every paired difference 0, said as no difference shown
    assert summary["compare"]["images"] == len(rows)
    assert all(ci == [0.0, 0.0] for ci in summary["compare"]["ci95"].values())
    assert "dice                +0.0000  (+0.0000 to +0.0000): no difference shown" in stdout
