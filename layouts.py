"""Data folders: where each ISIC release (2016, 2017, 2018), HAM10000 and a plain images/ + masks/
folder keep their images and masks, the image/mask pairs in them and the split of each pair, and
the built-in synthetic set that stands in when there is no data folder.

    pairs, problems, layout = find_pairs("data/isic2018")

Files only, no pixels (imaging.py decodes; data.py makes training arrays): evaluate.py and
export.py find their pairs here, predict.py a data folder's photos.
"""
import hashlib
import os
from dataclasses import dataclass

import common
from imaging import image_files


@dataclass(frozen=True)
class Pair:
    id: str  # e.g. "ISIC_0000000"
    image: str  # path to the image file
    mask: str  # path to the mask file
    split: str  # "train" | "val" | "test"


# (split, image folder, mask folder) per layout, the split being the official one. A "train" folder
# is also the pool that split_of() carves any missing split out of, by a hash of the image id.
LAYOUTS = {
    "isic2018": [
        ("train", "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
        ("val", "ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
        ("test", "ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
    ],
    "isic2017": [
        ("train", "ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
        ("val", "ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
        ("test", "ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"),
    ],
    "isic2016": [
        ("train", "ISBI2016_ISIC_Part1_Training_Data", "ISBI2016_ISIC_Part1_Training_GroundTruth"),
        ("test", "ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth"),
    ],
    # HAM10000 ships its images in two folders that share one mask folder, and no official split.
    "ham10000": [
        ("train", "HAM10000_images_part_1", "HAM10000_segmentations_lesion_tschandl"),
        ("train", "HAM10000_images_part_2", "HAM10000_segmentations_lesion_tschandl"),
    ],
    "generic": [("train", "images", "masks")],
}
MASK_SUFFIXES = ("", "_segmentation", "_mask")  # ISIC: ID_segmentation.png (2016: _Segmentation)
# HAM10000 has several photos of a lesion: with this file, the split hashes lesions, not images.
LESION_METADATA = "HAM10000_metadata.csv"


def split_of(image_id, val_fraction=0.1, test_fraction=0.1):
    """Split from a sha1 of the id: the same on every machine and for any file order. Test takes
    the lowest hashes, so changing val_fraction never moves an image into or out of test."""
    u = int(hashlib.sha1(image_id.encode()).hexdigest()[:12], 16) / 16**12
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def layout_of(root):
    """The name of the first LAYOUTS entry with an image folder in root, else None."""
    return next((name for name, folders in LAYOUTS.items()
                 if any(os.path.isdir(os.path.join(root, f[1])) for f in folders)), None)


def folders_of(value):
    """A data setting as train.py stores it in run.json (None, one path, or a list of paths for
    several --data folders) as a list of paths."""
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def data_folders(value, cache=None):
    """folders_of(value), or for None the built-in synthetic set (made on first use): every
    command's data when no --data names any."""
    if folders_of(value):
        return folders_of(value)
    from extras import synthetic  # only a command without --data draws the set (once)
    return [synthetic.synthetic_dir(write_synthetic, cache=cache)]


def find_pairs(root, val_fraction=0.1, test_fraction=0.1):
    """(pairs sorted by id, problems [{"file", "problem"}], layout name); an image without its mask
    is a problem with "kind": "no_mask". Raises Error for a missing folder or one with no
    recognised layout / no images."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise common.Error(root, "no such folder")
    layout = layout_of(root)
    if layout is None:
        raise common.Error(root, "no known layout (expected ISIC 2016/2017/2018 or HAM10000 "
                                 "folders, or images/ + masks/)")
    folders = LAYOUTS[layout]
    present = {split for split, img_dir, _ in folders if os.path.isdir(os.path.join(root, img_dir))}
    # A split without its official folder is carved out of the training folder by hash.
    pool_val = 0.0 if "val" in present else val_fraction
    pool_test = 0.0 if "test" in present else test_fraction

    groups, metadata = {}, os.path.join(root, LESION_METADATA)
    if os.path.isfile(metadata):
        from extras import lesions  # HAM10000: every image of a lesion in one split
        groups = lesions.lesion_groups(metadata)
    # A mask folder shared by several image folders (HAM10000) is read once, and its orphans are
    # only known after the last image folder that uses it.
    last_use = {mask_dir: i for i, (split, _, mask_dir) in enumerate(folders) if split in present}
    pairs, problems, seen, mask_sets = [], [], {}, {}
    for i, (split, img_dir, mask_name) in enumerate(folders):
        if split not in present:
            continue
        mask_dir = os.path.join(root, mask_name)
        if mask_name not in mask_sets:
            masks = mask_sets[mask_name] = {}
            # matched case-insensitively: 2016 uses _Segmentation
            for path in image_files(mask_dir):
                stem = os.path.splitext(os.path.basename(path))[0].lower()
                if stem in masks:
                    problems.append({"file": path, "problem": f"second mask with this name "
                                     f"(already {masks[stem]}); ignored"})
                else:
                    masks[stem] = path
        masks = mask_sets[mask_name]
        for path in image_files(os.path.join(root, img_dir)):
            image_id = os.path.splitext(os.path.basename(path))[0]
            names = [(image_id + suffix).lower() for suffix in MASK_SUFFIXES]
            mask = next((masks.pop(n) for n in names if n in masks), None)
            if image_id in seen:
                problems.append({"file": path, "problem": f"duplicate id {image_id} "
                                 f"(already {seen[image_id]}); skipped"})
                continue
            seen[image_id] = path
            if mask is None:
                # kind: evaluate.py says these are for predict.py, not skipped by mistake
                problems.append({"file": path, "kind": "no_mask", "problem": f"no mask (expected "
                                 f"{image_id}_segmentation.png or {image_id}.png in {mask_dir})"})
                continue
            group = groups.get(image_id, image_id)
            s = split if split != "train" else split_of(group, pool_val, pool_test)
            pairs.append(Pair(image_id, path, mask, s))
        if last_use[mask_name] == i:
            for path in masks.values():
                problems.append({"file": path, "problem": "orphan mask (no image with this id)"})
    if not pairs and not problems:
        raise common.Error(root, f"no images found ({layout} layout)")
    pairs.sort(key=lambda p: p.id)
    return pairs, problems, layout


def source_names(folders):
    """Short, unique, CSV-safe names for train.py's log columns and evaluate.py's
    output folders: the folder names, numbered if they clash."""
    names = []
    for folder in folders:
        base = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.basename(folder))
        base = base or "data"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


# --- The built-in synthetic set, in the ISIC 2018 layout ------------------------------------------
def write_synthetic(out, count, seed=0, size_wh=(384, 288)):
    """A synthetic set of `count` pairs in `out`, in the ISIC 2018 training layout (the set every
    command uses without --data: extras/synthetic.py's synthetic_dir)."""
    from extras import synthetic  # only a run without --data draws the set

    _, image_dir, mask_dir = LAYOUTS["isic2018"][0]
    synthetic.write_pairs(os.path.join(out, image_dir), os.path.join(out, mask_dir), count, seed,
                          size_wh)
