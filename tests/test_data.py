"""Tests for data.py: layouts, bad input, decoding, cache, synthetic data, batches, CLI.
(Augmentation: tests/test_augment.py.)"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST
from hypothesis import given, settings, strategies as st
from PIL import Image

import common
import data
import imaging
import layouts
from extras import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# helpers: tiny image / mask files

def blob(h, w, cy=0.5, cx=0.5, ry=0.3, rx=0.3):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy * h) / (ry * h)) ** 2 + ((xx - cx * w) / (rx * w)) ** 2 < 1


def save_image(path, h=24, w=32, fmt=None, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt)
    return path


def save_mask(path, h=24, w=32):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(blob(h, w).astype(np.uint8) * 255).save(path)
    return path


def make_isic(root, image_dir, mask_dir, ids, suffix="_segmentation"):
    for i in ids:
        save_image(os.path.join(root, image_dir, f"{i}.jpg"))
        save_mask(os.path.join(root, mask_dir, f"{i}{suffix}.png"))


def problem_for(problems, path):
    hits = [p["problem"] for p in problems if os.path.abspath(p["file"]) == os.path.abspath(path)]
    assert len(hits) == 1, (path, problems)
    return hits[0]


# -----------------------------------------------------------------------------
# layouts

def test_isic2018_official_folders_define_splits(tmp_path):
    make_isic(tmp_path, "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth",
              [f"ISIC_{i:07d}" for i in range(30)])
    make_isic(tmp_path, "ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth",
              ["ISIC_1000000", "ISIC_1000001"])
    (tmp_path / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("not an image")
    pairs, problems, layout = layouts.find_pairs(tmp_path)
    assert layout == "isic2018" and problems == []
    assert [p.id for p in pairs] == sorted(p.id for p in pairs) and len(pairs) == 32
    assert {p.id for p in pairs if p.split == "val"} == {"ISIC_1000000", "ISIC_1000001"}
    # no Test folder: test is carved out of Training by hash, val is not (official val exists)
    for p in pairs:
        if p.id.startswith("ISIC_00"):
            assert p.split == layouts.split_of(p.id, 0.0, 0.1)
            assert p.mask.endswith(p.id + "_segmentation.png")


def test_isic2017_ignores_superpixels(tmp_path):
    make_isic(tmp_path, "ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth", ["ISIC_0000001"])
    make_isic(tmp_path, "ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth", ["ISIC_0000002"])
    make_isic(tmp_path, "ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth", ["ISIC_0000003"])
    save_image(str(tmp_path / "ISIC-2017_Training_Data" / "ISIC_0000001_superpixels.png"))
    pairs, problems, layout = layouts.find_pairs(tmp_path)
    assert layout == "isic2017" and problems == []
    assert [(p.id, p.split) for p in pairs] == [
        ("ISIC_0000001", "train"), ("ISIC_0000002", "val"), ("ISIC_0000003", "test")]


def test_isic2016_capitalised_mask_suffix(tmp_path):
    ids = [f"ISIC_{i:07d}" for i in range(20)]
    make_isic(tmp_path, "ISBI2016_ISIC_Part1_Training_Data", "ISBI2016_ISIC_Part1_Training_GroundTruth",
              ids, suffix="_Segmentation")
    make_isic(tmp_path, "ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth",
              ["ISIC_0009999"], suffix="_Segmentation")
    pairs, problems, layout = layouts.find_pairs(tmp_path, val_fraction=0.3)
    assert layout == "isic2016" and problems == [] and len(pairs) == 21
    assert [p.id for p in pairs if p.split == "test"] == ["ISIC_0009999"]
    assert {p.split for p in pairs if p.id in ids} <= {"train", "val"}


def test_generic_layout_same_stem_any_extension(tmp_path):
    save_image(str(tmp_path / "images" / "a.png"))
    save_image(str(tmp_path / "images" / "b.jpeg"))
    save_image(str(tmp_path / "images" / "c.tif"))
    save_mask(str(tmp_path / "masks" / "a.png"))
    save_mask(str(tmp_path / "masks" / "b.bmp"))
    save_mask(str(tmp_path / "masks" / "c_mask.png"))
    pairs, problems, layout = layouts.find_pairs(tmp_path)
    assert layout == "generic" and problems == []
    assert [p.id for p in pairs] == ["a", "b", "c"]
    arrays = data.load_arrays(pairs, 16, progress=False)
    assert arrays.images.shape == (3, 16, 16, 3) and arrays.masks.shape == (3, 16, 16)


def test_missing_and_empty_folders_raise(tmp_path):
    with pytest.raises(common.Error, match="no such folder"):
        layouts.find_pairs(tmp_path / "nope")
    with pytest.raises(common.Error, match="no known layout"):
        layouts.find_pairs(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(common.Error, match="no images"):
        layouts.find_pairs(tmp_path)


# -----------------------------------------------------------------------------
# bad input: one problem line per file, skipped by default, common.Error under strict

@pytest.fixture
def bad_folder(tmp_path):
    img, msk = tmp_path / "images", tmp_path / "masks"
    for name in ("good", "truncated", "empty", "notimage", "nomask", "wrongsize", "badmask",
                 "dup"):
        save_image(str(img / f"{name}.jpg"))
        if name != "nomask":
            save_mask(str(msk / f"{name}.png"))
    blob_bytes = (img / "truncated.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(blob_bytes[: len(blob_bytes) // 2])
    (img / "empty.jpg").write_bytes(b"")
    (img / "notimage.jpg").write_text("<html>404 not found</html>")
    save_mask(str(msk / "wrongsize.png"), h=10, w=10)
    (msk / "badmask.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    save_image(str(img / "dup.png"))  # the same id twice
    save_mask(str(msk / "orphan.png"))
    return tmp_path


def test_every_bad_input_is_one_named_problem(bad_folder):
    img, msk = bad_folder / "images", bad_folder / "masks"
    pairs, problems, _ = layouts.find_pairs(bad_folder)
    assert "duplicate id dup" in problem_for(problems, img / "dup.png")
    assert "no mask" in problem_for(problems, img / "nomask.jpg")
    assert "orphan mask" in problem_for(problems, msk / "orphan.png")
    arrays = data.load_arrays(pairs, 16, progress=False)
    assert [p.id for p in arrays.pairs] == ["dup", "good"]
    found = arrays.problems
    assert "truncated" in problem_for(found, img / "truncated.jpg")
    assert "empty file" in problem_for(found, img / "empty.jpg")
    assert "not an image" in problem_for(found, img / "notimage.jpg")
    assert "10x10" in problem_for(found, msk / "wrongsize.png")
    assert problem_for(found, msk / "badmask.png")
    assert len(found) == 5
    for p in problems + found:
        assert "\n" not in p["problem"]
    with pytest.raises(common.Error, match="badmask.png: truncated or corrupt"):
        data.load_arrays(pairs, 16, strict=True, progress=False)  # the first problem, by id


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_a_problem(tmp_path, monkeypatch):
    save_image(str(tmp_path / "images" / "big.png"), h=40, w=40)
    save_mask(str(tmp_path / "masks" / "big.png"), h=40, w=40)
    pairs, _, _ = layouts.find_pairs(tmp_path)
    for limit in (1000, 500):  # over the warning limit, and over Pillow's own error limit (2x)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        arrays = data.load_arrays(pairs, 8, cache=False, progress=False)
        assert arrays.pairs == []
        assert "decompression bomb" in problem_for(arrays.problems, tmp_path / "images" / "big.png")


def test_load_split_strict_and_empty_split(bad_folder):
    with pytest.raises(common.Error):
        data.load_split(str(bad_folder), split="all", size=8, strict=True, progress=False)
    arrays = data.load_split(str(bad_folder), split="all", size=8, progress=False)
    assert len(arrays.pairs) == 2 and len(arrays.problems) == 8
    with pytest.raises(common.Error, match="no pairs in split"):
        data.load_split(str(bad_folder), split="val", size=8, val_fraction=0, progress=False)


# -----------------------------------------------------------------------------
# decoding

@pytest.mark.parametrize("kind", ["0/255", "0/1", "16bit", "palette", "rgb", "la", "bilevel"])
def test_load_mask_variants(tmp_path, kind):
    truth = blob(20, 30)
    u8 = truth.astype(np.uint8)
    img = {"0/255": lambda: Image.fromarray(u8 * 255),
           "0/1": lambda: Image.fromarray(u8),
           "16bit": lambda: Image.fromarray(truth.astype(np.uint16) * 65535),
           "palette": lambda: Image.fromarray(u8 * 255).convert("P"),
           "rgb": lambda: Image.fromarray(np.dstack([u8 * 255] * 3)),
           "la": lambda: Image.fromarray(np.dstack([u8 * 255, np.full_like(u8, 255)]), "LA"),
           "bilevel": lambda: Image.fromarray(u8 * 255).convert("1")}[kind]()
    img.save(tmp_path / "m.png")
    mask = imaging.load_mask(str(tmp_path / "m.png"))
    assert mask.dtype == bool and np.array_equal(mask, truth)


def test_load_image_exif_rotation_and_draft(tmp_path):
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif)
    assert imaging.read_image(str(tmp_path / "r.jpg"))[0].shape == (60, 40, 3)
    Image.fromarray(np.zeros((800, 1200, 3), np.uint8)).convert("L").save(tmp_path / "g.jpg")
    full = imaging.read_image(str(tmp_path / "g.jpg"))[0]
    small = imaging.read_image(str(tmp_path / "g.jpg"), min_size=(64, 64))[0]
    assert full.shape == (800, 1200, 3) and full.dtype == np.uint8
    assert small.shape == (100, 150, 3)  # 1/8 scale: still >= 64 on both sides


def test_resize_prob_shape_and_range():
    prob = np.random.default_rng(0).random((30, 50)).astype(np.float32)
    out = imaging.resize_prob(prob, (61, 17))
    assert out.shape == (61, 17) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1


@FAST
@given(h=st.integers(32, 120), w=st.integers(32, 120), size=st.integers(32, 96),
       cy=st.floats(0.35, 0.65), cx=st.floats(0.35, 0.65), r=st.floats(0.15, 0.3))
def test_resize_mask_round_trip_keeps_area(h, w, size, cy, cx, r):
    mask = blob(h, w, cy, cx, r, r * 1.2)
    small = imaging.resize_mask(mask, (size, size))
    back = imaging.resize_mask(small, (h, w))
    assert small.dtype == bool and back.shape == (h, w)
    assert abs(small.mean() - mask.mean()) < 0.02
    assert abs(back.mean() - mask.mean()) < 0.03


# -----------------------------------------------------------------------------
# split

@FAST
@given(ids=st.lists(st.text("abcdefghij_0123456789", min_size=1, max_size=12), unique=True,
                    min_size=2, max_size=40), seed=st.integers(0, 1000), data_=st.data())
def test_split_deterministic_and_leak_free_under_permutation(tmp_path_factory, ids, seed, data_):
    # Two folders, the same images written in other orders and one of them with only some of them:
    # each image lands in the same split in both (no split depends on which other files exist).
    keep = data_.draw(st.lists(st.sampled_from(ids), min_size=1, unique=True))
    shuffled = list(np.random.default_rng(seed).permutation(keep))
    splits = []
    for order in (ids, shuffled):
        root = tmp_path_factory.mktemp("split")
        make_isic(str(root), *layouts.LAYOUTS["generic"][0][1:], order)
        pairs, problems, _ = layouts.find_pairs(str(root))
        assert not problems and sorted(p.id for p in pairs) == sorted(order)
        splits.append({p.id: p.split for p in pairs})
    full, part = splits
    assert all(part[i] == full[i] for i in keep) and set(full.values()) <= {"train", "val", "test"}
    assert full == {i: layouts.split_of(i) for i in ids}
    # more validation never moves an image into or out of test
    assert all((layouts.split_of(i, 0.3, 0.1) == "test") == (full[i] == "test") for i in ids)


def test_split_fractions_and_folder_order(tmp_path):
    ids = [f"ISIC_{i:07d}" for i in range(3000)]
    counts = {s: sum(layouts.split_of(i, 0.15, 0.1) == s for i in ids) for s in ("val", "test")}
    assert abs(counts["val"] / 3000 - 0.15) < 0.03 and abs(counts["test"] / 3000 - 0.1) < 0.03
    names = ["z9", "a1", "m5", "b2", "q7", "c3"]  # files created in a scrambled order
    for name in names:
        save_image(str(tmp_path / "images" / f"{name}.png"), 4, 4)
        save_mask(str(tmp_path / "masks" / f"{name}.png"), 4, 4)
    pairs, _, _ = layouts.find_pairs(tmp_path, 0.3, 0.3)
    assert [(p.id, p.split) for p in pairs] == [(n, layouts.split_of(n, 0.3, 0.3)) for n in sorted(names)]


# -----------------------------------------------------------------------------
# cache

def test_cache_second_run_decodes_nothing(synthetic_data, tmp_path, monkeypatch):
    pairs, _, _ = layouts.find_pairs(synthetic_data)
    first = data.load_arrays(pairs, 32, cache=str(tmp_path), progress=False)
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.startswith(".tmp")]

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr(imaging, "read_image", no_decode)
    second = data.load_arrays(pairs, 32, cache=str(tmp_path), progress=False)
    assert np.array_equal(first.images, second.images) and np.array_equal(first.masks, second.masks)
    assert first.pairs == second.pairs
    with pytest.raises(AssertionError):  # another size is another key
        data.load_arrays(pairs[:1], 16, cache=str(tmp_path), progress=False)


def test_damaged_cache_entry_is_rebuilt(synthetic_data, tmp_path):
    pairs, _, _ = layouts.find_pairs(synthetic_data)
    first = data.load_arrays(pairs[:2], 16, cache=str(tmp_path), progress=False)
    entries = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len(entries) == 2 and all(e.endswith(".npy") for e in entries)
    with open(entries[0], "wb") as f:
        f.write(b"half a file")
    again = data.load_arrays(pairs[:2], 16, cache=str(tmp_path), progress=False)
    assert np.array_equal(first.images, again.images) and again.problems == []


def test_cache_key_follows_file_identity(tmp_path):
    save_image(str(tmp_path / "images" / "a.png"), 8, 8)
    save_mask(str(tmp_path / "masks" / "a.png"), 8, 8)
    pair = layouts.find_pairs(tmp_path)[0][0]
    key = data.cache_entry(pair, 32, "cache")
    assert key == data.cache_entry(pair, 32, "cache") and key != data.cache_entry(pair, 64, "cache")
    st_ = os.stat(pair.image)
    os.utime(pair.image, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    assert data.cache_entry(pair, 32, "cache") != key


def test_read_only_cache_still_loads(synthetic_data, tmp_path):
    pairs, _, _ = layouts.find_pairs(synthetic_data)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        arrays = data.load_arrays(pairs[:3], 16, cache=str(ro), progress=False)
    finally:
        ro.chmod(0o700)
    assert len(arrays.pairs) == 3 and arrays.masks.max() == 1


@pytest.mark.slow
def test_load_split_default_is_synthetic():
    # data=None: the built-in synthetic set (200 pairs, seed 0, 384x288), written once into the cache
    # folder, here the per-session temp folder that conftest puts in $SKIN_UNET_CACHE.
    arrays = data.load_split(None, "train", size=32, progress=False)
    root = layouts.data_folders(None)[0]
    assert os.path.dirname(root) == os.environ["SKIN_UNET_CACHE"] and os.path.isdir(root)
    assert common.cache_dir() == os.environ["SKIN_UNET_CACHE"]  # so nothing went to ~/.cache
    assert arrays.images.dtype == np.uint8 and arrays.images.shape[1:] == (32, 32, 3)
    assert arrays.masks.dtype == np.uint8 and set(np.unique(arrays.masks)) <= {0, 1}
    assert arrays.problems == [] and all(p.split == "train" for p in arrays.pairs)
    # the same arrays as loading that folder explicitly
    explicit = data.load_split(root, "train", size=32, progress=False)
    assert arrays.pairs == explicit.pairs and all(p.image.startswith(root + os.sep) for p in arrays.pairs)
    assert np.array_equal(arrays.images, explicit.images) and np.array_equal(arrays.masks, explicit.masks)
    everything = data.load_split(None, "all", size=32, progress=False)
    assert len(everything.pairs) == 200 and everything.pairs[0].id == "ISIC_0000000"
    assert len(arrays.pairs) == sum(layouts.split_of(p.id) == "train" for p in everything.pairs)
    # and it is make_synthetic(seed=0) at 384x288: pair 0's mask is the generator's mask 0
    _, masks = synthetic.make_synthetic(1, seed=0)
    assert np.array_equal(imaging.load_mask(everything.pairs[0].mask), masks[0])
    assert np.array_equal(everything.masks[0], imaging.resize_mask(masks[0], (32, 32)).astype(np.uint8))


def test_atomic_path_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "report.json"
    old = b'{"old": true}\n'
    target.write_bytes(old)
    seen = []
    with pytest.raises(RuntimeError, match="disk on fire"):
        with common.atomic_path(str(target)) as tmp:
            seen.append(tmp)
            with open(tmp, "wb") as f:
                f.write(b'{"new": tr')  # half a file, then the writer fails
            assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".tmp-")
            assert target.read_bytes() == old  # readers still see the old file during the write
            raise RuntimeError("disk on fire")
    assert seen and not os.path.exists(seen[0])
    assert target.read_bytes() == old
    assert os.listdir(tmp_path) == ["report.json"]
    # the same path then succeeds normally
    with common.atomic_path(str(target)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["report.json"]


# -----------------------------------------------------------------------------
# synthetic data

def test_make_synthetic_deterministic_inside_non_empty():
    images, masks = synthetic.make_synthetic(6, seed=3, size_wh=(96, 72))
    again, _ = synthetic.make_synthetic(3, seed=3, size_wh=(96, 72))
    other, _ = synthetic.make_synthetic(3, seed=4, size_wh=(96, 72))
    assert images.shape == (6, 72, 96, 3) and images.dtype == np.uint8 and masks.dtype == bool
    assert np.array_equal(images[:3], again) and not np.array_equal(images[:3], other)
    for m in masks:
        assert 0.02 < m.mean() < 0.6
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
    # the lesion is darker than the skin around it: learnable
    gray = images.mean(axis=3)
    assert all(gray[i][masks[i]].mean() < gray[i][~masks[i]].mean() - 20 for i in range(6))


@settings(max_examples=15, deadline=None)
@given(w=st.integers(12, 96), h=st.integers(12, 96), seed=st.integers(0, 10**6))
def test_synthetic_lesion_inside_and_non_empty_any_size(w, h, seed):
    images, masks = synthetic.make_synthetic(2, seed=seed, size_wh=(w, h))
    assert images.shape == (2, h, w, 3) and masks.shape == (2, h, w)
    for m in masks:
        assert m.any() and not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


def test_synthetic_dir_written_once(tmp_path):
    path = synthetic.synthetic_dir(layouts.write_synthetic, count=3, seed=1, cache=str(tmp_path))
    assert path == synthetic.synthetic_dir(layouts.write_synthetic, count=3, seed=1, cache=str(tmp_path))
    pairs, problems, layout = layouts.find_pairs(path)
    assert layout == "isic2018" and len(pairs) == 3 and problems == []
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []
    mask = imaging.load_mask(pairs[0].mask)
    images, masks = synthetic.make_synthetic(1, seed=1)
    assert np.array_equal(mask, masks[0])


# -----------------------------------------------------------------------------
# Batches

def test_batches_shapes_shuffle_and_epochs():
    images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 3), np.uint8)
    masks = np.zeros((10, 8, 8), np.uint8)
    masks[:, 2:6, 2:6] = 1
    batches = data.Batches(images, masks, batch_size=4, augment=False, seed=1)
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (4, 8, 8, 3) and x.dtype == np.uint8
    assert y.shape == (4, 8, 8, 1) and y.dtype == np.uint8 and set(np.unique(y)) == {0, 1}
    epoch0 = np.concatenate([batches[i][0][:, 0, 0, 0] for i in range(3)])
    assert sorted(epoch0) == list(range(10))
    batches.on_epoch_end()
    epoch1 = np.concatenate([batches[i][0][:, 0, 0, 0] for i in range(3)])
    assert sorted(epoch1) == list(range(10)) and list(epoch0) != list(epoch1)
    again = data.Batches(images, masks, batch_size=4, augment=False, seed=1)
    assert np.array_equal(again[0][0], data.Batches(images, masks, 4, augment=False, seed=1)[0][0])
    full = data.Batches(images, masks, batch_size=4, drop_remainder=True)
    assert len(full) == 2 and all(len(full[i][0]) == 4 for i in range(2))
    assert len(data.Batches(images, masks, batch_size=4, drop_remainder=True, steps=1)) == 1
    assert len(data.Batches(images[:3], masks[:3], batch_size=4, drop_remainder=True)) == 1  # < 1 batch
    aug = data.Batches(images, masks, batch_size=4, augment=True, seed=1)
    assert np.array_equal(aug[1][1], aug[1][1])  # the same batch twice: same augmentation


@FAST
@given(processes=st.sampled_from([1, 2, 4]), per=st.integers(1, 3), seed=st.integers(0, 99),
       epoch=st.integers(0, 3), augment=st.booleans())
def test_each_process_gets_its_part_of_the_one_process_stream(processes, per, seed, epoch, augment):
    images, masks = synthetic.make_synthetic(13, seed=0, size_wh=(16, 16))
    batch = processes * per
    whole = data.Batches(images, masks.astype(np.uint8), batch, augment=augment, seed=seed, epoch=epoch)
    parts = [data.Batches(images, masks.astype(np.uint8), batch, augment=augment, seed=seed, epoch=epoch,
                          part=(i, processes)) for i in range(processes)]
    for index in range(len(whole)):
        want = whole.draw(index)
        got = [p.draw(index) for p in parts]
        for k in range(4):  # images, masks, colour draws, affine draws: the pieces make the whole
            assert np.array_equal(np.concatenate([g[k] for g in got]), want[k])
        x = np.concatenate([p[index][0] for p in parts])  # and so do the augmented batches
        assert np.array_equal(x, whole[index][0])


def test_batches_resume_at_an_epoch_continues_the_stream():
    images, masks = synthetic.make_synthetic(10, seed=0, size_wh=(16, 16))
    stream = data.Batches(images, masks, batch_size=4, seed=3)
    for _ in range(2):
        stream.on_epoch_end()
    resumed = data.Batches(images, masks, batch_size=4, seed=3, epoch=2)
    for i in range(len(stream)):
        assert all(np.array_equal(a, b) for a, b in zip(stream[i], resumed[i]))
    assert not np.array_equal(data.Batches(images, masks, 4, seed=3)[0][0], resumed[0][0])


def test_batches_feed_model_fit():
    keras = common.import_keras()

    images, masks = synthetic.make_synthetic(6, seed=0, size_wh=(16, 16))
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    batches = data.Batches(images, masks.astype(np.uint8), batch_size=4)
    history = model.fit(data.feed(batches, workers=2), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and batches.epoch >= 1


def test_data_imports_no_keras():
    code = "import data, sys; data.Batches; assert 'keras' not in sys.modules, 'keras imported'"
    # and no extras module, which only a flag or an input asks for: no lesion metadata reader
    # without the file, no command line without the command; no synthetic set drawn
    code += ("; import numpy as np; data.Batches(np.zeros((2, 4, 4, 3), np.uint8),"
             " np.zeros((2, 4, 4), np.uint8), 2, augment=False)[0]"
             "; loaded = [m for m in sys.modules if m.startswith('extras')]"
             "; assert not loaded, loaded")
    env = dict(os.environ, KERAS_BACKEND="jax")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


# -----------------------------------------------------------------------------
# command line

def test_cli_json(synthetic_data, capsys):
    assert data.main([synthetic_data, "--json", "--size", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 24 and report["problems"] == []
    assert sum(report["splits"].values()) == 24 and set(report["splits"]) == {"train", "val", "test"}
    assert report["layout"] == "isic2018"


def test_cli_problems_and_strict(bad_folder, capsys):
    assert data.main([str(bad_folder), "--json", "--size", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 2 and len(report["problems"]) == 8
    assert data.main([str(bad_folder), "--strict", "--size", "8"]) == 2  # bad input
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_synthetic_and_human_output(tmp_path, capsys):
    assert data.main(["--synthetic", str(tmp_path / "s"), "--count", "2", "--width", "64"]) == 0
    assert data.main([str(tmp_path / "s"), "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "isic2018 layout, 2 usable pairs" in out and "64x48" in out


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_cli_errors_are_one_line_without_traceback(tmp_path, folder):
    path = tmp_path / "missing" if folder == "missing" else tmp_path
    out = subprocess.run([sys.executable, "data.py", str(path)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"error: {path}: ") and out.stderr.count("\n") == 1, out.stderr
