"""Several data sets: the HAM10000 layout, its split by lesion, train.py with several --data folders
(per-source validation Dice, resume, refusal of a changed source list) and evaluate.py per source.
Every data set here is a tiny synthetic folder built in tmp."""
import collections
import csv
import json
import os
import shutil
import tempfile

import conftest
import pytest
from hypothesis import given, settings, strategies as st

import common
import curves
import data
import layouts
import train
from extras import sources as extra_sources

HAM = layouts.LAYOUTS["ham10000"]
PART_1, PART_2, MASKS = HAM[0][1], HAM[1][1], HAM[0][2]
TINY = [*conftest.TINY, "--jit", "off", "--no-augment", "--verbose", "0", "--val-fraction", "0.3"]


def touch(path):
    """find_pairs only looks at names, never decodes: an empty file is enough to be found."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def make_ham_names(root, lesions, missing=()):
    """A HAM10000-layout folder of empty files: image i of `lesions` (a list of lesion numbers)
    goes to part 1 or 2 alternately; the metadata lists every image except those in `missing`."""
    rows = []
    for i, lesion in enumerate(lesions):
        image_id = f"ISIC_{i:07d}"
        touch(os.path.join(root, PART_1 if i % 2 else PART_2, image_id + ".jpg"))
        touch(os.path.join(root, MASKS, image_id + "_segmentation.png"))
        if i not in missing:
            rows.append(f"HAM_{lesion:07d},{image_id},nv,histo,50.0,male,back,vidir_modern")
    with open(os.path.join(root, layouts.LESION_METADATA), "w") as f:
        f.write("lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n" + "\n".join(rows) + "\n")


def lesion_of(root):
    with open(os.path.join(root, layouts.LESION_METADATA)) as f:
        return {r["image_id"]: r["lesion_id"] for r in csv.DictReader(f)}


# --- the HAM10000 layout ---------------------------------------------------------------------------

def test_ham_two_image_folders_share_one_mask_folder(tmp_path):
    make_ham_names(tmp_path, [0, 1, 2, 3, 4, 5])
    touch(str(tmp_path / PART_1 / "ISIC_0000099.jpg"))  # no mask
    touch(str(tmp_path / MASKS / "ISIC_0000077_segmentation.png"))  # no image
    pairs, problems, layout = layouts.find_pairs(tmp_path)
    assert layout == "ham10000"
    assert [p.id for p in pairs] == [f"ISIC_{i:07d}" for i in range(6)]
    assert {os.path.basename(os.path.dirname(p.image)) for p in pairs} == {PART_1, PART_2}
    assert all(p.mask == str(tmp_path / MASKS / f"{p.id}_segmentation.png") for p in pairs)
    # a mask of an image in part 2 is not an orphan of part 1: orphans are known after both
    assert sorted((os.path.basename(p["file"]), p["problem"].split(" (")[0]) for p in problems) == [
        ("ISIC_0000077_segmentation.png", "orphan mask"), ("ISIC_0000099.jpg", "no mask")]


def test_every_image_of_a_lesion_lands_in_one_split(tmp_path):
    # 300 images of 60 lesions: hashing image ids would split many lesions (checked below, so this
    # test fails if the grouping is dropped); hashing lesion ids splits none.
    lesions = [i % 60 for i in range(300)]
    make_ham_names(tmp_path, lesions)
    pairs, problems, _ = layouts.find_pairs(tmp_path, 0.2, 0.2)
    assert problems == [] and len(pairs) == 300
    lesion = lesion_of(tmp_path)
    splits = collections.defaultdict(set)
    for p in pairs:
        splits[lesion[p.id]].add(p.split)
        assert p.split == layouts.split_of(lesion[p.id], 0.2, 0.2)
    assert all(len(s) == 1 for s in splits.values())
    assert {s for v in splits.values() for s in v} == {"train", "val", "test"}
    by_image = collections.defaultdict(set)
    for p in pairs:
        by_image[lesion[p.id]].add(layouts.split_of(p.id, 0.2, 0.2))
    assert sum(len(s) > 1 for s in by_image.values()) > 10


@settings(max_examples=30, deadline=None)
@given(lesions=st.lists(st.integers(0, 7), min_size=1, max_size=25),
       missing=st.sets(st.integers(0, 24), max_size=5),
       val=st.floats(0, 0.45), test=st.floats(0, 0.45))
def test_no_lesion_in_two_splits_and_unlisted_images_fall_back_to_their_id(lesions, missing, val, test):
    root = tempfile.mkdtemp(prefix="ham-")
    try:
        make_ham_names(root, lesions, missing)
        pairs, problems, _ = layouts.find_pairs(root, val, test)
        lesion = lesion_of(root)
        assert problems == [] and len(pairs) == len(lesions)
        splits = collections.defaultdict(set)
        for p in pairs:
            group = lesion.get(p.id, p.id)
            splits[group].add(p.split)
            assert p.split == layouts.split_of(group, val, test)
        assert all(len(s) == 1 for s in splits.values())
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("text,needle", [
    ("image,lesion\nISIC_0000000,HAM_1\n", "needs lesion_id and image_id columns"),
    ("", "needs lesion_id and image_id columns (has none)"),
])
def test_metadata_without_the_columns_is_one_error(tmp_path, text, needle):
    make_ham_names(tmp_path, [0, 1])
    (tmp_path / layouts.LESION_METADATA).write_text(text)
    with pytest.raises(common.Error, match=needle.replace("(", r"\(").replace(")", r"\)")):
        layouts.find_pairs(tmp_path)


def synthetic_ham(root, count, seed):
    """A synthetic set moved into the HAM10000 layout, two images per lesion."""
    layouts.write_synthetic(root, count, seed, size_wh=(48, 36))
    images, masks = (os.path.join(root, f) for f in layouts.LAYOUTS["isic2018"][0][1:])
    for i, name in enumerate(sorted(os.listdir(images))):
        os.renames(os.path.join(images, name), os.path.join(root, PART_1 if i % 2 else PART_2, name))
    os.renames(masks, os.path.join(root, MASKS))
    with open(os.path.join(root, layouts.LESION_METADATA), "w") as f:
        f.write("lesion_id,image_id\n" + "".join(f"HAM_{i // 2:07d},ISIC_{i:07d}\n" for i in range(count)))
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("sources")
    isic = str(base / "isic")
    layouts.write_synthetic(isic, 16, seed=1, size_wh=(48, 36))
    return [isic, synthetic_ham(str(base / "ham"), 20, seed=2)]


def test_load_split_of_several_folders_keeps_each_folders_rows_together(sources):
    arrays = data.load_split(sources, "val", size=16, val_fraction=0.3, progress=False)
    alone = [data.load_split(s, "val", size=16, val_fraction=0.3, progress=False) for s in sources]
    assert [(s["path"], s["layout"]) for s in arrays.sources] == [(s, layout) for s, layout in
                                                                  zip(sources, ("isic2018", "ham10000"))]
    for span, one in zip(arrays.sources, alone):
        assert arrays.pairs[span["start"]:span["stop"]] == one.pairs
        assert (arrays.images[span["start"]:span["stop"]] == one.images).all()
    assert arrays.sources[-1]["stop"] == len(arrays.pairs)


# --- train.py and evaluate.py with two --data folders ------------------------------------------------

def read_log(out):
    with open(os.path.join(out, "log.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_sources_train_resume_refuse_and_evaluate_per_source(sources, tmp_path, capsys):
    import evaluate

    out = str(tmp_path / "run")
    args = ["--data", sources[0], "--data", sources[1], "--out", out, *TINY]
    assert train.train([*args, "--epochs", "1"])["epochs_done"] == 1
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["data"] == sources
    counts = {name: layouts.find_pairs(s, 0.3)[0] for name, s in zip(("isic", "ham"), sources)}
    assert [(s["name"], s["path"], s["train"], s["val"]) for s in run["data_summary"]["sources"]] == [
        (name, path, sum(p.split == "train" for p in counts[name]), sum(p.split == "val" for p in counts[name]))
        for name, path in zip(("isic", "ham"), sources)]
    assert run["data_summary"]["train"] == sum(s["train"] for s in run["data_summary"]["sources"])
    log = read_log(out)
    assert list(log[0]) == curves.LOG_FIELDS + ["val_dice_isic", "val_dice_ham"]
    assert all(0 <= float(log[0][k]) <= 1 for k in ("val_dice", "val_dice_isic", "val_dice_ham"))
    # One validation pass gives both: the whole is the image-weighted mean of the parts, and it is what
    # the compiled loss and metrics say of the saved model on the union of the val splits.
    n = [s["val"] for s in run["data_summary"]["sources"]]
    parts = [float(log[0]["val_dice_isic"]), float(log[0]["val_dice_ham"])]
    assert float(log[0]["val_dice"]) == pytest.approx((n[0] * parts[0] + n[1] * parts[1]) / sum(n), abs=1e-6)
    import keras
    val = data.load_split(sources, "val", size=32, val_fraction=0.3, progress=False)
    scores = keras.models.load_model(os.path.join(out, "best.keras")).evaluate(
        val.images, val.masks[..., None], batch_size=4, verbose=0, return_dict=True)
    assert scores["dice"] == pytest.approx(float(log[0]["val_dice"]), abs=1e-5)
    assert scores["loss"] == pytest.approx(float(log[0]["val_loss"]), rel=1e-4)

    # --epochs raised: continues after epoch 1, per-source columns kept
    assert train.train([*args, "--epochs", "2"])["epochs_done"] == 2
    log = read_log(out)
    assert [r["epoch"] for r in log] == ["1", "2"] and log[1]["val_dice_ham"] != ""
    # another source list is another run: refused, one line naming the change
    with pytest.raises(common.Error, match="another configuration.*data .*--fresh"):
        train.train(["--data", sources[0], "--out", out, *TINY, "--epochs", "2"])
    with pytest.raises(common.Error, match="another configuration"):
        train.train(["--data", sources[1], "--data", sources[0], "--out", out, *TINY, "--epochs", "2"])
    with pytest.raises(common.Error, match="given twice"):
        train.train(["--data", sources[0], "--data", sources[0], "--out", out, *TINY])

    # evaluate.py without --data: each source's val split, then all together
    capsys.readouterr()
    ev = str(tmp_path / "eval")
    assert evaluate.main(["--weights", os.path.join(out, "best.keras"), "--out", ev, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"isic: {sources[0]}" in printed and f"ham: {sources[1]}" in printed and "all 2 sources" in printed
    together = json.load(open(os.path.join(ev, "summary.json")))
    per = {name: json.load(open(os.path.join(ev, name, "summary.json"))) for name in ("isic", "ham")}
    assert {n: s["images"] for n, s in per.items()} == {s["name"]: s["val"] for s in run["data_summary"]["sources"]}
    assert together["images"] == sum(s["images"] for s in per.values())
    assert together["sources"]["ham"]["dice"] == per["ham"]["dice"]
    mean = sum(s["dice"] * s["images"] for s in per.values()) / together["images"]
    assert together["dice"] == pytest.approx(mean)

    # export.py reads the same list from run.json: calibration and Dice over both sources' splits
    import export
    report = export.export(os.path.join(out, "best.keras"), out=str(tmp_path / "export"), quantize=(),
                           threads=(1,), calibration=4, bench_runs=1, progress=False)
    assert report["data"] == sources and report["eval_images"] == together["images"]


@pytest.mark.slow
def test_data_is_stored_as_a_list_and_an_old_run_with_one_string_resumes(sources, tmp_path):
    assert train.config_of(["--data", sources[0]]).data == [sources[0]]
    assert train.config_of(["--data", sources[0], "--data", sources[1]]).data == sources
    out = str(tmp_path / "run")
    args = ["--data", sources[0], "--out", out, *TINY]
    train.train([*args, "--epochs", "1"])
    assert list(read_log(out)[0]) == curves.LOG_FIELDS  # no per-source columns for one source
    paths = {"last": os.path.join(out, "last.keras")}
    state = train.read_state(paths["last"])
    assert state["config"]["data"] == [sources[0]]
    # A run from before several folders were possible stored its one folder as a string: it resumes.
    from extras import resume
    now, defaults = {**state["config"], "data": [sources[0]]}, train.Config().identity()
    resume.check_same_run({"config": {**state["config"], "data": sources[0]}}, now, defaults,
                          paths["last"])  # no error: the same single folder
    with pytest.raises(common.Error, match="another configuration"):
        resume.check_same_run({"config": {**state["config"], "data": sources[1]}}, now, defaults,
                              paths["last"])
    assert train.train([*args, "--epochs", "2"])["epochs_done"] == 2


# --- weighting the sources (--balance) and starting from other weights (--init) ----------------------

@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=2, max_size=3), seed=st.integers(0, 2**16),
       epoch=st.integers(0, 5))
def test_balance_draws_every_source_as_often_as_the_largest(sizes, seed, epoch):
    import numpy as np

    starts = np.cumsum([0, *sizes])
    spans = list(zip(starts[:-1].tolist(), starts[1:].tolist()))
    rows = np.arange(starts[-1])
    batches = extra_sources.Balanced(rows, rows, 4, spans, augment=False, seed=seed, epoch=epoch)
    longest = max(sizes)
    assert len(batches.order) == len(sizes) * longest and len(batches) == -(-len(sizes) * longest // 4)
    counts = np.bincount(batches.order, minlength=len(rows))
    for (a, b), size in zip(spans, sizes):
        assert counts[a:b].sum() == longest  # each source fills the same share of the epoch
        assert set(counts[a:b]) <= {longest // size, -(-longest // size)}  # and uses its rows evenly
    again = extra_sources.Balanced(rows, rows, 4, spans, augment=False, seed=seed, epoch=epoch)
    assert np.array_equal(batches.order, again.order)  # a pure function of (seed, epoch): resume-safe


@pytest.mark.slow
def test_balance_and_init_in_train(sources, tmp_path):
    import keras
    import numpy as np

    with pytest.raises(common.Error, match="--balance: needs two or more --data folders"):
        train.config_of(["--data", sources[0], "--balance"])
    with pytest.raises(common.Error, match="--init .*nothing.keras: file not found"):
        train.config_of(["--init", str(tmp_path / "nothing.keras")])

    # --balance: an epoch is both training splits, each drawn as often as the larger one
    out = str(tmp_path / "balanced")
    train.train(["--data", sources[0], "--data", sources[1], "--balance", "--out", out, *TINY, "--epochs", "1"])
    split = json.load(open(os.path.join(out, "run.json")))["data_summary"]["sources"]
    assert split[0]["train"] != split[1]["train"]
    steps = 2 * max(s["train"] for s in split) // 4
    assert int(keras.models.load_model(os.path.join(out, "last.keras")).optimizer.iterations.numpy()) == steps

    # --init: a run with a vanishing learning rate ends where its starting weights were
    tuned = str(tmp_path / "tuned")
    train.train(["--data", sources[0], "--init", os.path.join(out, "best.keras"), "--lr", "1e-12",
                 "--out", tuned, *TINY, "--epochs", "1"])
    start, end = (keras.models.load_model(os.path.join(d, "best.keras"), compile=False) for d in (out, tuned))
    for a, b in zip(start.trainable_weights, end.trainable_weights):
        assert np.allclose(a.numpy(), b.numpy(), atol=1e-6)
    assert json.load(open(os.path.join(tuned, "run.json")))["init"] == os.path.join(out, "best.keras")
    with pytest.raises(common.Error, match="another configuration.*init"):
        train.train(["--data", sources[0], "--out", tuned, *TINY, "--epochs", "2"])
    with pytest.raises(common.Error, match="--init .*best.keras: cannot start from its weights"):
        train.train(["--data", sources[0], "--init", os.path.join(out, "best.keras"), "--filters", "6",
                     "--out", str(tmp_path / "other"), *TINY[:2], *TINY[4:], "--epochs", "1"])
