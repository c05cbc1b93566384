"""extras/archive.py's archive form and the LiteRT lanes (extras/formats.py) that run it: an HDF5
archive's masks in one file, committed a part at a time so that a kill -9 loses at most a part and
a rerun finishes the archive with every photo once; parts merged even when an id is in two; LiteRT
lanes called from several threads at once give the numbers of one interpreter."""
import csv
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, kill_9_after_rows
from PIL import Image

import common
import predict
from extras import archive, synthetic

h5py = pytest.importorskip("h5py")
RELEASED_INT8 = os.path.join(ROOT, "models", "skin_unet_int8.tflite")


def _write_archive(path, count, size_wh=(48, 36)):
    images, _ = synthetic.make_synthetic(4, seed=3, size_wh=size_wh)
    with h5py.File(path, "w") as f:
        for i in range(count):
            buffer = io.BytesIO()
            Image.fromarray(images[i % 4]).save(buffer, "JPEG", quality=90)
            f.create_dataset(f"ISIC_{i:07d}", data=np.void(buffer.getvalue()))


def _masks(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()].tobytes() for k in f}


def _ids(csv_path):
    with open(csv_path, newline="") as f:
        return [row["image_id"] for row in csv.DictReader(f)]


def _png(value):
    return archive.MaskArchive.encode(np.arange(12).reshape(3, 4) % value == 0)


def test_parts_merge_once_each_and_a_kill_leaves_only_whole_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(archive, "PART_PHOTOS", 2)
    csv_path = tmp_path / "predictions.csv"
    csv_path.write_text(",".join(predict.COLUMNS) + "\n")
    masks = archive.MaskArchive(str(tmp_path), str(csv_path), predict.COLUMNS)
    for i in range(3):
        masks.add(f"ISIC_{i}", _png(i + 2), {"image_id": f"ISIC_{i}"})
    # Two masks committed as one part, and their rows after it; the third waits for its part.
    assert masks.ids() == {"ISIC_0", "ISIC_1"} and _ids(csv_path) == ["ISIC_0", "ISIC_1"]
    # What a kill in the middle of writing a part leaves (its temp file) is never read.
    (tmp_path / archive.PARTS / ".tmp-x.hdf5").write_bytes(b"half a file")
    assert archive.MaskArchive(str(tmp_path), str(csv_path), predict.COLUMNS).ids() == masks.ids()
    masks.close()
    assert sorted(os.listdir(tmp_path)) == ["masks.hdf5", "predictions.csv"]
    merged = _masks(tmp_path / "masks.hdf5")
    assert sorted(merged) == ["ISIC_0", "ISIC_1", "ISIC_2"] and _ids(csv_path) == sorted(merged)
    assert merged["ISIC_2"] == _png(4)
    # A kill after the merge's rename, before the parts went: an id in masks.hdf5 and in a part
    # again is kept once; a new one is added.
    again = archive.MaskArchive(str(tmp_path), str(csv_path), predict.COLUMNS)
    again.add("ISIC_1", merged["ISIC_1"], {"image_id": "ISIC_1"})
    again.add("ISIC_9", _png(5), {"image_id": "ISIC_9"})
    again.close()
    assert _masks(tmp_path / "masks.hdf5") == {**merged, "ISIC_9": _png(5)}
    # A masks file that is not HDF5 (damaged by hand, say) stops a rerun in one line naming it.
    (tmp_path / "masks.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(common.Error, match=r"masks\.hdf5: not a readable HDF5 file .*--overwrite"):
        archive.MaskArchive(str(tmp_path), str(csv_path), predict.COLUMNS).ids()
    # --overwrite starts from nothing.
    archive.MaskArchive(str(tmp_path), str(csv_path), predict.COLUMNS, overwrite=True).close()
    assert not (tmp_path / "masks.hdf5").exists() and not (tmp_path / archive.PARTS).exists()


@pytest.mark.slow
def test_kill_9_mid_archive_then_rerun_finishes_it_once(tmp_path):
    source = tmp_path / "train-image.hdf5"
    _write_archive(source, 600)
    out = tmp_path / "out"
    code = ("import sys; from extras import archive; archive.PART_PHOTOS = 40; import predict; "
            f"sys.exit(predict.main(['--weights', {RELEASED_INT8!r}, '--data', {str(source)!r}, "
            f"'--out', {str(out)!r}, '--no-progress']))")
    cmd = [sys.executable, "-c", code]
    csv_path = out / "predictions.csv"
    rows_at_kill = kill_9_after_rows(cmd, csv_path, 80)  # two parts committed, then killed
    assert 80 <= rows_at_kill < 600, rows_at_kill  # killed mid-way
    assert not (out / "masks.hdf5").exists()  # the parts are all there is
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "photos already done" in r.stdout
    ids = [f"ISIC_{i:07d}" for i in range(600)]
    assert sorted(_ids(csv_path)) == ids  # each row exactly once, none lost
    masks = _masks(out / "masks.hdf5")
    assert sorted(masks) == ids and sorted(os.listdir(out)) == ["masks.hdf5", "predictions.csv"]
    first = {k: masks[k] for k in ids[:4]}  # the archive repeats 4 photos: so do the masks
    assert all(masks[k] == first[ids[i % 4]] for i, k in enumerate(ids))


@pytest.mark.parametrize("lanes, callers", [(1, 3), (2, 2), (2, 5)])
def test_lanes_run_at_once_and_give_the_numbers_of_one_interpreter(lanes, callers):
    from concurrent.futures import ThreadPoolExecutor

    from extras import formats

    pytest.importorskip("ai_edge_litert")
    from ai_edge_litert.interpreter import Interpreter  # as a phone runs it

    batches = [np.random.default_rng(i).integers(0, 256, (1 + i % 3, 128, 128, 3), dtype=np.uint8)
               for i in range(6)]
    shape, one = formats.open_tflite(RELEASED_INT8, lanes=1)
    _, run = formats.open_tflite(RELEASED_INT8, lanes=lanes)
    assert shape == [1, 128, 128, 3] and run.lanes == lanes
    alone = [one(x) for x in batches]
    phone = Interpreter(model_path=RELEASED_INT8, num_threads=1)
    phone.allocate_tensors()
    (i,), (o,) = phone.get_input_details(), phone.get_output_details()
    for x, probs in zip(batches, alone):
        for image, prob in zip(x, probs):
            phone.set_tensor(i["index"], image[None])
            phone.invoke()
            y = phone.get_tensor(o["index"])[0, ..., 0]  # uint8: the mask is y > 128
            assert np.array_equal(prob, (y.astype(np.float32) - o["quantization"][1]) * o["quantization"][0])
    with ThreadPoolExecutor(callers) as pool:  # more callers than lanes wait for a free one
        together = list(pool.map(run, batches))
    assert all(np.array_equal(a, b) and a.shape == (len(x), 128, 128)
               for a, b, x in zip(alone, together, batches))
