"""predict.py: native_prob and its figures / overlay, the bulk path (--data photos/ --out masks/),
data folders, bad files, all three formats (extras/formats.py), and extras/archive.py's part: HDF5
archives, reruns that skip finished photos, kills; neither extras module loads unless asked for."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import MANY, ROOT, kill_9_after_rows, run_cli
from hypothesis import given, strategies as st
from PIL import Image

import evaluate
import imaging
import inference
import layouts
import metrics
import predict
from extras import synthetic


@pytest.fixture(scope="module")
def model(tiny_model):
    """conftest's tiny untrained U-Net as .keras and its Predictor: shapes, not skill, count here."""
    path = tiny_model["paths"]["keras"]
    return path, inference.load_predictor(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Plain photos, no layout, no masks: a non-square PNG, a JPEG and a JPEG stored 120x80 with
    EXIF orientation 6 (displayed 80x120)."""
    folder = tmp_path_factory.mktemp("photos")
    images, _ = synthetic.make_synthetic(3, seed=1, size_wh=(160, 96))
    Image.fromarray(images[0]).save(folder / "wide.png")
    Image.fromarray(images[1]).save(folder / "plain.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(images[2][:80, :120]).save(folder / "rotated.jpg", quality=95, exif=exif)
    return str(folder), {"wide": (96, 160), "plain": (96, 160), "rotated": (120, 80)}


def _run(argv, capsys, command=predict):
    return run_cli(command, [*argv, "--no-progress"], capsys)


def _rows(folder):
    with open(os.path.join(folder, "predictions.csv")) as f:
        return {r["image_id"]: r for r in csv.DictReader(f)}


def _review_ok(rows, threshold=metrics.REVIEW_THRESHOLD):
    """Every row carries an uncertainty in [0, 1) and review == (uncertainty > threshold)."""
    assert rows
    for row in rows.values():
        u = float(row["uncertainty"])
        assert 0.0 <= u < 1.0 and row["review"] == str(int(u > threshold)), row


def _mask(folder, image_id):
    with Image.open(os.path.join(folder, f"{image_id}_segmentation.png")) as m:
        assert m.mode == "L"
        return np.asarray(m)


# ---------------------------------------------------------------------------- the functions

def _reference_stats(mask, prob):
    """native_prob's figures worked out from a whole native-size mask and map."""
    mask = np.asarray(mask, bool)
    area = int(np.count_nonzero(mask))
    inside = float(np.sum(prob, where=mask, dtype=np.float64))
    h, w = mask.shape
    return {"area_px": area, "area_percent": 100.0 * area / (h * w) if h * w else 0.0,
            "mean_prob": inside / area if area else 0.0, "width": int(w), "height": int(h)}


def _one_photo(predictor, file, threshold=0.5, tta=False):
    """(stats, native mask) of one photo the way predict.py and app.py make it: the draft decode at
    preview size, the model on its squash, the map resized back to the native size."""
    native = imaging.native_hw(file)
    preview = predict.decode_preview(file, native)
    x = imaging.resize_image(preview, (predictor.size, predictor.size))[None]
    small = inference.predict_probs(predictor, x, tta)[0]
    mask, stats = predict.native_mask(small, native, threshold)
    return {**stats, "uncertainty": float(metrics.uncertainty(small, threshold))}, mask


def test_native_prob_returns_the_thresholded_mask_at_native_size(model):
    _, predictor = model
    image = synthetic.make_synthetic(1, size_wh=(70, 45))[0][0]
    small = inference.predict_probs(predictor, imaging.resize_image(image, (predictor.size, predictor.size))[None])[0]
    prob = imaging.resize_prob(small, (45, 70))
    mask, stats = predict.native_mask(small, (45, 70), threshold=0.5)
    assert prob.shape == mask.shape == (45, 70)
    assert prob.dtype == np.float32 and mask.dtype == bool
    assert np.array_equal(mask, prob > 0.5)
    assert stats == _reference_stats(mask, prob)
    low, _ = predict.native_mask(small, (45, 70), threshold=0.0)
    assert np.array_equal(low, prob > 0.0)
    x = imaging.resize_image(image, (predictor.size, predictor.size))[None]
    flips = inference.predict_probs(predictor, x, tta=True)
    by_hand = (predictor.predict(x) + predictor.predict(x[:, :, ::-1])[:, :, ::-1]
               + predictor.predict(x[:, ::-1])[:, ::-1]) / 3
    np.testing.assert_allclose(flips, by_hand, atol=1e-6)
    assert imaging.resize_prob(flips[0], (45, 70)).shape == (45, 70)
    with pytest.raises(ValueError):
        inference.predict_probs(predictor, imaging.resize_image(image[..., 0], (predictor.size, predictor.size))[None])


@pytest.mark.parametrize("hw", [(288, 384), (1000, 700), (97, 131), (20, 20), (513, 3)])
def test_native_prob_in_bands_matches_one_resize(hw):
    """native_prob works out the native map a band of rows at a time (a 50-megapixel photo's whole
    map is 200 MB): the mask is one whole resize's but for rounding at the threshold itself."""
    rng = np.random.default_rng(hw[0])
    small = rng.random((32, 32)).astype(np.float32)
    mask, stats = predict.native_mask(small, hw, 0.5)
    prob = imaging.resize_prob(small, hw)
    expected = prob > 0.5
    differ = mask != expected
    assert np.all(np.abs(prob[differ] - 0.5) < 1e-4)  # only rounding, at the threshold itself
    assert differ.sum() <= 2
    reference = _reference_stats(mask, prob)
    assert stats["area_px"] == reference["area_px"]
    assert stats["mean_prob"] == pytest.approx(reference["mean_prob"], abs=1e-5)


@st.composite
def masks_and_probs(draw):
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    threshold = draw(st.sampled_from([0.0, 0.3, 0.5, 0.9]))
    kind = draw(st.sampled_from(["random", "blob", "empty", "full"]))
    if kind == "blob":
        yy, xx = np.mgrid[:h, :w]
        prob = np.exp(-((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (0.1 * h * w + 1))
    elif kind == "empty":
        prob = np.zeros((h, w))
    elif kind == "full":
        prob = np.ones((h, w))
    else:
        prob = rng.random((h, w))
    prob = prob.astype(np.float32)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return image, prob, prob > threshold, threshold


@MANY
@given(masks_and_probs())
def test_native_prob_stats_invariants(case):
    """At the model's own size the resize is the identity: the mask is prob > threshold exactly."""
    _, prob, mask, threshold = case
    native, stats = predict.native_mask(prob, prob.shape, threshold)
    assert np.array_equal(native, mask)
    assert set(stats) == {"area_px", "area_percent", "mean_prob", "width", "height"}
    assert stats["area_px"] == int(mask.sum()) and isinstance(stats["area_px"], int)
    assert 0.0 <= stats["area_percent"] <= 100.0
    assert stats["area_percent"] == pytest.approx(100.0 * mask.sum() / mask.size)
    assert (stats["height"], stats["width"]) == mask.shape
    if mask.any():
        assert stats["mean_prob"] > threshold or np.isclose(stats["mean_prob"], threshold)
        assert stats["mean_prob"] == pytest.approx(float(prob[mask].mean()), rel=1e-5)
    else:
        assert stats["mean_prob"] == 0.0


@MANY
@given(masks_and_probs(), st.booleans())
def test_overlay_changes_only_the_lesion_and_outlines_it(case, with_prob):
    image, prob, mask, _ = case
    out = predict.draw_overlay(image, mask, prob if with_prob else None, unsure=False)  # no hatch: below
    assert out.shape == image.shape and out.dtype == np.uint8
    # Outside the mask (so also outside any dilation of it) the photo is untouched.
    assert np.array_equal(out[~mask], image[~mask])
    # Every mask pixel touching the background or the frame is drawn in the outline colour.
    padded = np.pad(mask, 1)
    edge = mask & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    assert np.all(out[edge] == predict.OUTLINE)


@MANY
@given(masks_and_probs())
def test_overlay_hatches_only_where_the_model_is_unsure(case):
    """The hatch is the only difference the `unsure` switch makes: drawn in its own colour, only on
    pixels whose probability is in the unsure band (inside the mask or not), never over the
    outline; a map of only 0 and 1 gets none."""
    image, prob, mask, _ = case
    plain = predict.draw_overlay(image, mask, prob, unsure=False)
    out = predict.draw_overlay(image, mask, prob)  # the hatch is on by default
    changed = np.any(out != plain, axis=-1)
    band = (prob >= predict.UNSURE_LOW) & (prob <= predict.UNSURE_HIGH)
    assert not changed[~band].any()
    assert np.all(out[changed] == predict.HATCH)
    assert np.all(out[mask & (plain == predict.OUTLINE).all(-1)] == predict.OUTLINE)
    sure = (prob > 0.5).astype(np.float32)
    assert np.array_equal(predict.draw_overlay(image, mask, sure),
                          predict.draw_overlay(image, mask, sure, unsure=False))
    assert np.array_equal(predict.draw_overlay(image, mask), predict.draw_overlay(image, mask, unsure=False))


def test_overlay_hatch_is_sparse_and_covers_the_band():
    """A map of 0.5 everywhere and no mask: the hatch is on 1 pixel in HATCH_EVERY, spread over the
    whole photo (every row has some), and the rest of the photo is untouched."""
    image = np.full((64, 48, 3), 120, np.uint8)
    out = predict.draw_overlay(image, np.zeros((64, 48), bool), np.full((64, 48), 0.5, np.float32))
    hatched = np.all(out == predict.HATCH, axis=-1)
    assert hatched.sum() == 64 * 48 // predict.HATCH_EVERY
    assert hatched.any(axis=1).all() and hatched.any(axis=0).all()
    assert np.all(out[~hatched] == 120)


def test_overlay_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        predict.draw_overlay(np.zeros((4, 5, 3), np.uint8), np.zeros((5, 4), bool))


# ---------------------------------------------------------------------------- the command line

def test_photos_without_masks(model, photos, tmp_path, capsys):
    weights, predictor = model
    folder, native = photos
    out = tmp_path / "out"
    code, stdout, err = _run(["--weights", weights, "--data", folder, "--out", str(out)], capsys)
    assert code == 0, err
    assert "predicted 3 (0 skipped)" in stdout and "skipped:" not in err
    rows = _rows(out)
    assert set(rows) == set(native)
    _review_ok(rows)
    flagged = sum(r["review"] == "1" for r in rows.values())
    assert f"review: {flagged} of 3 photos flagged, uncertainty over 0.200 (the default" in stdout
    files = {f"{i}{suffix}" for i in native for suffix in ("_segmentation.png", "_overlay.jpg")}
    assert set(os.listdir(out)) == files | {"predictions.csv"}  # no temp files left behind
    for image_id, hw in native.items():
        mask = _mask(out, image_id)
        assert mask.shape == hw  # native size, after EXIF rotation for "rotated"
        assert set(np.unique(mask)) <= {0, 255}
        row = rows[image_id]
        assert (int(row["height"]), int(row["width"])) == hw
        assert int(row["area_px"]) == int((mask == 255).sum())
        assert float(row["area_percent"]) == pytest.approx(100 * (mask == 255).mean(), abs=1e-4)
        assert row["file"] == os.path.join(folder, next(n for n in os.listdir(folder)
                                                        if n.startswith(image_id + ".")))
        with Image.open(out / f"{image_id}_overlay.jpg") as o:
            assert (o.height, o.width) == hw
        # One source of truth: the batch path gives exactly what one photo gets in the web app.
        stats, expected = _one_photo(predictor, row["file"])
        assert np.array_equal(mask == 255, expected)
        assert float(row["uncertainty"]) == pytest.approx(stats["uncertainty"], abs=1e-6)
        assert float(row["mean_prob"]) == pytest.approx(stats["mean_prob"], abs=1e-6)
    # --no-overlay: masks and rows only.
    code, _, _ = _run(["--weights", weights, "--data", folder, "--out", str(tmp_path / "bare"), "--no-overlay"], capsys)
    assert code == 0 and not [n for n in os.listdir(tmp_path / "bare") if n.endswith("_overlay.jpg")]


def test_one_photo_and_evaluate_points_photos_to_predict(model, photos, tmp_path, capsys):
    weights, _ = model
    folder, native = photos
    photo = os.path.join(folder, "rotated.jpg")
    code, stdout, _ = _run(["--weights", weights, "--data", photo, "--out", str(tmp_path / "one")], capsys)
    assert code == 0 and "predicted 1 (0 skipped)" in stdout
    assert list(_rows(tmp_path / "one")) == ["rotated"]
    _review_ok(_rows(tmp_path / "one"))
    assert _mask(tmp_path / "one", "rotated").shape == native["rotated"]
    # evaluate.py scores against masks: plain photos are one clear error line naming predict.py.
    for data_arg in (folder, photo):
        code, _, err = _run(["--weights", weights, "--data", data_arg], capsys, command=evaluate)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "predict.py" in lines[0] and "no masks" in lines[0]


def test_rerun_skips_finished_photos_and_overwrite_redoes_them(model, photos, tmp_path, capsys):
    weights, _ = model
    folder = tmp_path / "photos"
    shutil.copytree(photos[0], folder)
    argv = ["--weights", weights, "--data", str(folder), "--out", str(folder)]  # outputs beside the photos
    code, stdout, _ = _run(argv, capsys)
    assert code == 0 and "predicted 3 (0 skipped)" in stdout  # our own outputs are not photos
    first = (folder / "predictions.csv").read_text()
    code, stdout, _ = _run(argv, capsys)
    assert code == 0 and "3 photos already done" in stdout and "predicted 0 (0 skipped)" in stdout
    assert (folder / "predictions.csv").read_text() == first
    # A photo whose mask is gone, and a last row cut short (a kill mid-write), are redone; the rest kept.
    os.remove(folder / "wide_segmentation.png")
    lines = first.splitlines(keepends=True)
    (folder / "predictions.csv").write_text("".join(lines[:-1]) + lines[-1][:10])
    cut = lines[-1].split(",")[0]
    code, stdout, _ = _run(argv, capsys)
    redo = {"wide", cut}
    assert code == 0 and f"{3 - len(redo)} photos already done" in stdout and f"predicted {len(redo)} " in stdout
    assert sorted(_rows(folder)) == ["plain", "rotated", "wide"]  # every photo exactly once
    assert len((folder / "predictions.csv").read_text().splitlines()) == 4
    code, stdout, _ = _run([*argv, "--overwrite"], capsys)
    assert code == 0 and "predicted 3 (0 skipped)" in stdout and "already done" not in stdout
    assert (folder / "predictions.csv").read_text() == first
    # A predictions.csv that is not ours (here the same table saved as UTF-16) is refused, untouched.
    (folder / "predictions.csv").write_text(first, encoding="utf-16")
    code, _, err = _run(argv, capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (f"error: {folder / 'predictions.csv'}: not a predictions.csv of this "
                                         "command; choose another --out, or --overwrite")
    assert (folder / "predictions.csv").read_text(encoding="utf-16") == first
    # One an older predict.py wrote, before the uncertainty and review columns: said as such.
    old = "".join(",".join(line.split(",")[:-2]) + "\n" for line in first.splitlines())
    (folder / "predictions.csv").write_text(old)
    code, _, err = _run(argv, capsys)
    assert code == 2 and "written by an older predict.py, without the uncertainty and review columns; --overwrite" in err
    assert (folder / "predictions.csv").read_text() == old


@pytest.mark.slow
def test_kill_9_mid_archive_then_rerun_finishes_it_once(model, tmp_path):
    weights, _ = model
    folder = tmp_path / "many"
    folder.mkdir()
    images, _ = synthetic.make_synthetic(4, seed=3, size_wh=(48, 36))
    for i in range(240):
        Image.fromarray(images[i % 4]).save(folder / f"p{i:04d}.jpg", quality=90)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "predict.py"), "--weights", weights, "--data", str(folder),
           "--out", str(out), "--no-progress", "--no-overlay"]
    csv_path = out / "predictions.csv"
    rows_at_kill = kill_9_after_rows(cmd, csv_path, 16)
    assert 16 <= rows_at_kill < 240, rows_at_kill  # killed mid-way, not before or after
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "photos already done" in r.stdout
    with open(csv_path, newline="") as f:
        ids = [row["image_id"] for row in csv.DictReader(f)]
    assert sorted(ids) == [f"p{i:04d}" for i in range(240)]  # each exactly once, none lost
    assert len([n for n in os.listdir(out) if n.endswith("_segmentation.png")]) == 240


def test_isic_2024_hdf5_archive(model, tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    import io

    weights, predictor = model
    images, _ = synthetic.make_synthetic(3, seed=4, size_wh=(133, 127))  # SLICE-3D crops are ~130 px
    archive = tmp_path / "train-image.hdf5"
    with h5py.File(archive, "w") as f:  # as the challenge ships it: one scalar of JPEG bytes per isic_id
        for i, image in enumerate(images):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "JPEG", quality=95)
            f.create_dataset(f"ISIC_{i:07d}", data=np.void(buffer.getvalue()))
        f.create_dataset("ISIC_9999998", data=h5py.Empty("S1"))  # a dataset with no data at all
        f.create_dataset("ISIC_9999999", data=np.void(b"\xff\xd8 not a jpeg"))
    out = tmp_path / "out"
    code, stdout, err = _run(["--weights", weights, "--data", str(archive), "--out", str(out)], capsys)
    assert code == 0 and "predicted 3 (2 skipped)" in stdout, err
    skipped = [line for line in err.splitlines() if line.startswith("skipped:")]
    assert skipped[0] == f"skipped: {archive}:ISIC_9999998: the dataset holds no image bytes"
    assert len(skipped) == 2 and skipped[1].startswith(f"skipped: {archive}:ISIC_9999999: ")
    assert f"wrote {out}/: masks.hdf5, predictions.csv" in err
    # The archive form: every mask in one HDF5 file laid out as the photos' (PNG bytes per isic_id),
    # no file per photo, no overlays unless asked for, nothing left of the parts.
    assert sorted(os.listdir(out)) == ["masks.hdf5", "predictions.csv"]
    rows = _rows(out)
    assert sorted(rows) == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    _review_ok(rows)
    with h5py.File(out / "masks.hdf5", "r") as f:
        assert sorted(f) == sorted(rows)
        stored = {k: f[k][()].tobytes() for k in f}
    for i in range(len(images)):
        image_id = f"ISIC_{i:07d}"
        assert rows[image_id]["file"] == f"{archive}:{image_id}"
        with Image.open(io.BytesIO(stored[image_id])) as m:
            assert m.format == "PNG" and m.mode == "L"
            mask = np.asarray(m)
        assert mask.shape == (127, 133) and set(np.unique(mask)) <= {0, 255}
        decoded = tmp_path / f"{image_id}.jpg"
        decoded.write_bytes(h5py.File(archive)[image_id][()].tobytes())
        assert np.array_equal(mask == 255, _one_photo(predictor, str(decoded))[1])
        assert int(rows[image_id]["area_px"]) == int(np.count_nonzero(mask))
    # A rerun has nothing left to do and leaves the file as it was; --overlay adds the pictures.
    code, stdout, _ = _run(["--weights", weights, "--data", str(archive), "--out", str(out)], capsys)
    assert code == 0 and "3 photos already done" in stdout
    with h5py.File(out / "masks.hdf5", "r") as f:
        assert {k: f[k][()].tobytes() for k in f} == stored
    code, stdout, err = _run(["--weights", weights, "--data", str(archive), "--out", str(tmp_path / "o2"),
                              "--overlay"], capsys)
    assert code == 0 and f"wrote {tmp_path / 'o2'}/: masks.hdf5, <id>_overlay.jpg, predictions.csv" in err
    assert len(list((tmp_path / "o2").glob("*_overlay.jpg"))) == 3
    assert _run(["--weights", weights, "--data", str(tmp_path / "missing.hdf5"), "--out", str(out)], capsys)[0] == 2


def test_data_folders_predict_every_image_and_evaluate_skips_the_maskless(model, synthetic_data, tmp_path, capsys):
    weights, _ = model
    root = tmp_path / "data"
    shutil.copytree(synthetic_data, root)
    pairs, _, _ = layouts.find_pairs(str(root))
    lone = pairs[:3]
    for pair in lone:
        os.remove(pair.mask)
    # evaluate.py scores the 21 pairs and names the 3 images it cannot score, and where to go.
    code, stdout, err = _run(["--weights", weights, "--data", str(root), "--split", "all",
                              "--out", str(tmp_path / "eval")], capsys, command=evaluate)
    assert code == 0, err
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["images"] == 21
    for p in lone:
        assert f"skipped: {p.image}: no mask to score against (predict.py" in err
    # predict.py takes every image of a data folder, masks or not.
    code, stdout, err = _run(["--weights", weights, "--data", str(root), "--out", str(tmp_path / "masks")], capsys)
    assert code == 0 and "predicted 24 (0 skipped)" in stdout, err
    assert set(_rows(tmp_path / "masks")) == {p.id for p in pairs}
    _review_ok(_rows(tmp_path / "masks"))


def test_bad_files_are_skipped_with_one_line(model, photos, tmp_path, capsys):
    weights, _ = model
    folder = tmp_path / "photos"
    shutil.copytree(photos[0], folder)
    with open(folder / "plain.jpg", "r+b") as f:
        f.truncate(300)
    (folder / "text.png").write_text("not an image at all")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    code, stdout, err = _run(["--weights", weights, "--data", str(folder), "--out", str(out)], capsys)
    assert code == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("skipped:")]
    bad = [str(folder / n) for n in ("empty.jpg", "plain.jpg", "text.png")]
    assert len(skipped) == 3
    for path, line in zip(bad, skipped):
        assert line.startswith(f"skipped: {path}: ") and line.count(path) == 1
    assert set(_rows(out)) == {"wide", "rotated"}
    assert "predicted 2 (3 skipped)" in stdout
    # Nothing readable at all: an error, not an empty success.
    code, _, err = _run(["--weights", weights, "--data", str(folder / "empty.jpg"),
                         "--out", str(tmp_path / "none")], capsys)
    assert code == 1 and err.strip().splitlines()[-1].startswith("error:")


def test_saved_model_and_tflite_share_the_path(tiny_model, photos, tmp_path, capsys):
    folder, native = photos
    areas = {}
    for name in ("keras", "saved_model", "tflite"):
        out = tmp_path / name
        code, stdout, err = _run(["--weights", tiny_model["paths"][name], "--data", folder, "--out", str(out)],
                                 capsys)
        assert code == 0 and "predicted 3 (0 skipped)" in stdout, (name, err)
        areas[name] = {i: int(r["area_px"]) for i, r in _rows(out).items()}
        assert all(_mask(out, i).shape == hw for i, hw in native.items())
    for name in ("saved_model", "tflite"):
        for image_id, area in areas["keras"].items():
            # An untrained net sits near 0.5; float noise flips only a sliver of pixels.
            assert abs(areas[name][image_id] - area) <= 0.02 * np.prod(native[image_id]), name


def test_extras_load_only_when_asked_for(model, photos, tmp_path, capsys, monkeypatch):
    """`import predict` loads no optional library and no extras module; a first run of a .keras
    model over a folder needs neither extras/archive.py nor extras/formats.py; a rerun into the
    same --out brings in archive (to resume) and nothing else."""
    probe = ("import sys, predict; print(sorted(m for m in ('h5py', 'gradio', 'matplotlib', "
             "'keras', 'tensorflow', 'extras.archive', 'extras.formats') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    weights, _ = model
    folder, _ = photos
    argv = ["--weights", weights, "--data", folder, "--out", str(tmp_path / "out")]
    import extras
    with monkeypatch.context() as blocked:  # any `from extras import <name>` now fails
        for name in ("archive", "formats"):
            blocked.delattr(extras, name, raising=False)
            blocked.setitem(sys.modules, f"extras.{name}", None)
        code, stdout, err = _run(argv, capsys)
    assert code == 0 and "predicted 3 (0 skipped)" in stdout, err
    with monkeypatch.context() as blocked:
        blocked.delattr(extras, "formats", raising=False)
        blocked.setitem(sys.modules, "extras.formats", None)
        code, stdout, err = _run(argv, capsys)
    assert code == 0 and "3 photos already done" in stdout, err
