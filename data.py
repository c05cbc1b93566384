"""Everything between a folder on disk and batches a U-Net can train on.

    python data.py DIR [--json] [--strict] [--size PX]   # check a data folder, build its cache
    python data.py --synthetic OUT --count N [--seed S] [--width W]   # write a synthetic set

Read top to bottom: finding pairs in the ISIC layouts, decoding, arrays at the training size,
batches for model.fit. In extras/: the array cache (cache.py), augmentation (augment.py), the
command line (data_check.py), the synthetic set (synthetic.py), HAM10000's lesions (lesions.py).
"""
import hashlib
import io
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

import common

# No Keras here (and so, with the default backend, no TensorFlow): `python data.py DIR` answers in
# a second, not after a 10 s import, and so does evaluate.py with a .tflite model.

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# Pillow warns (and only raises at twice the limit) for decompression bombs; we turn any image
# over Image.MAX_IMAGE_PIXELS into a reported problem ourselves, so the warning is just noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Pair:
    id: str  # e.g. "ISIC_0000000"
    image: str  # path to the image file
    mask: str  # path to the mask file
    split: str  # "train" | "val" | "test"


# --- Finding pairs --------------------------------------------------------------------------------
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


def image_files(folder):
    """Image files in a folder (not recursive), sorted; ISIC's *_superpixels.png and hidden
    files such as .DS_Store are not images we want."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names
            if not n.startswith(".") and n.lower().endswith(IMAGE_EXTS)
            and not os.path.splitext(n)[0].lower().endswith("_superpixels")
            and os.path.isfile(os.path.join(folder, n))]


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


# --- Decoding and resizing ------------------------------------------------------------------------
def open_image(path, raw=None):
    """Open an image lazily, turning every way a file can be bad into a one-line Error. raw: the
    file's bytes, when it lives inside another file (an HDF5 archive); path then only names it."""
    try:
        if (os.path.getsize(path) if raw is None else len(raw)) == 0:
            raise common.Error(path, "empty file (0 bytes)")
        img = Image.open(path if raw is None else io.BytesIO(raw))
    except common.Error:
        raise
    except FileNotFoundError:
        raise common.Error(path, "file not found") from None
    except Image.DecompressionBombError as e:
        raise common.Error(path, f"decompression bomb refused ({e})") from None
    except UnidentifiedImageError:
        raise common.Error(path, "not an image (Pillow cannot identify it)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise common.Error(path, f"truncated or corrupt image ({e})") from None
    pixels = img.width * img.height
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        img.close()
        raise common.Error(path, f"decompression bomb refused ({img.width}x{img.height} = {pixels} "
                    f"pixels > Pillow's limit {Image.MAX_IMAGE_PIXELS})")
    return img


def _decode(img, path, mode=None):
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return img.convert(mode) if mode and img.mode != mode else img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise common.Error(path, f"truncated or corrupt image ({e})") from None


def _on_its_side(img):
    """Whether the EXIF orientation (5 to 8) turns the picture on its side."""
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # a damaged EXIF block is not worth losing the image over
        return False


def _read_image(path, min_size=None, raw=None):
    """(uint8 HxWx3 RGB, native (h, w) after EXIF rotation). With min_size=(h, w), JPEG draft
    mode decodes at 1/2, 1/4 or 1/8 scale as long as the result stays >= min_size: a large ISIC
    original decodes many times faster, and the resize that follows antialiases anyway."""
    img = open_image(path, raw)
    w, h = img.size
    rotated = _on_its_side(img)
    if min_size is not None and img.format == "JPEG":
        want_h, want_w = min_size
        img.draft("RGB", (want_h, want_w) if rotated else (want_w, want_h))
    img = _decode(img, path, "RGB")
    return np.asarray(img), ((w, h) if rotated else (h, w))


def load_image(path, min_size=None, raw=None):
    """uint8 (H, W, 3) RGB with EXIF orientation applied (see _read_image for min_size and raw)."""
    return _read_image(path, min_size, raw)[0]


def native_hw(path, raw=None):
    """(h, w) as displayed (EXIF rotation applied), from the header only: no decode. A bad file
    is a one-line Error (open_image)."""
    with open_image(path, raw) as img:
        w, h = img.size
        return (w, h) if _on_its_side(img) else (h, w)


def load_mask(path):
    """bool (H, W), binarized exactly as the official ISIC scorer does: > 128 of 255. The one
    extension: 0/1 masks (max <= 1) count as > 0, where the scorer would see all background.
    16-bit masks are scaled to 8 bit first, palette/RGB/LA masks are converted to gray."""
    img = _decode(open_image(path), path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(img).astype(np.float64)
        if values.max() > 255 or img.mode != "I":
            values = values / 257.0  # 16 bit -> 8 bit
    elif img.mode == "F":
        values = np.asarray(img)
        values = values * 255.0 if values.max() <= 1.0 else values
    else:
        values = np.asarray(img.convert("L"))
    if values.max() <= 1:
        return values > 0
    return values > 128


def resize_image(image, size_hw):
    """uint8 HxWx3 -> size_hw, Pillow bilinear (antialiased when shrinking).
    Aspect: we SQUASH to the target shape, no crop or pad, so every pixel of the lesion is kept
    and a probability map resized back with resize_prob lands exactly on the original pixels."""
    h, w = size_hw
    if image.shape[:2] == (h, w):
        return np.array(image, dtype=np.uint8)
    return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((w, h), Image.BILINEAR))


def resize_mask(mask, size_hw):
    """bool -> bool at size_hw. Bilinear on 0/255 then > 127 keeps the area (unlike nearest,
    which drops or doubles whole rows when shrinking)."""
    h, w = size_hw
    mask = np.asarray(mask).astype(bool)
    if mask.shape == (h, w):
        return mask.copy()
    gray = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(gray.resize((w, h), Image.BILINEAR)) > 127


def resize_prob(prob, size_hw):
    """float probabilities -> float32 at size_hw (Pillow bilinear on mode "F")."""
    h, w = size_hw
    prob = np.asarray(prob, np.float32)
    if prob.shape == (h, w):
        return prob.copy()
    return np.asarray(Image.fromarray(prob).resize((w, h), Image.BILINEAR), dtype=np.float32)


# --- Arrays at the training size ------------------------------------------------------------------
@dataclass
class Arrays:
    pairs: list  # the usable pairs, same order as the arrays
    images: np.ndarray  # uint8 (N, S, S, 3)
    masks: np.ndarray  # uint8 (N, S, S) values 0/1
    problems: list  # [{"file", "problem"}] for the pairs that were skipped
    # load_split of several folders: [{"path", "layout", "start", "stop"}], the rows of each folder
    # (images[start:stop] are views, so per-source scores cost no copy); one source otherwise.
    sources: list = None


def _load_pair(pair, size, folder):
    """(image SxSx3 uint8, mask SxS uint8 0/1) for one pair, from the cache folder when it has it
    (extras/cache.py). Raises Error naming the bad file."""
    entry = None
    if folder:
        from extras import cache
        entry = cache.entry(pair, size, folder)
        hit = cache.read(entry, size)
        if hit is not None:
            return hit
    image, native = _read_image(pair.image, min_size=(size, size))
    mask = load_mask(pair.mask)
    if mask.shape != native:
        raise common.Error(pair.mask, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"is {native[1]}x{native[0]}")
    image = resize_image(image, (size, size))
    mask = resize_mask(mask, (size, size)).astype(np.uint8)
    if entry:
        cache.write(entry, image, mask)
    return image, mask


def load_arrays(pairs, size, cache=None, workers=None, strict=False, progress=True):
    """Decode each pair once (draft mode, all cores), squash-resize to size x size, check and cache
    it. Bad pairs are skipped and listed in problems; strict=True raises Error on the first one.
    cache: its folder (None: the default, extras/cache.py), or False: none.
    Threads, not processes: Pillow and NumPy release the GIL in decode, resize and file reads,
    and threads hand back arrays without pickling them (faster here: docs/benchmarks.md)."""
    pairs = list(pairs)
    folder = None
    if cache is not False:
        from extras import cache as disk
        folder = disk.folder(cache, size)
    images = np.zeros((len(pairs), size, size, 3), np.uint8)
    masks = np.zeros((len(pairs), size, size), np.uint8)
    ok, problems = np.zeros(len(pairs), bool), []
    bar = common.Progress(len(pairs), f"loading {size}px", progress)

    def work(i):
        try:
            images[i], masks[i] = _load_pair(pairs[i], size, folder)
            ok[i] = True
            return None
        except common.Error as e:
            return {"file": e.file, "problem": e.problem}

    pool = ThreadPoolExecutor(workers or os.cpu_count() or 1)
    try:
        for problem in pool.map(work, range(len(pairs))):
            bar.update()
            if problem:
                if strict:
                    raise common.Error(problem["file"], problem["problem"])
                problems.append(problem)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if ok.all():  # the usual case: no 0.5 GB copy just to drop nothing
        return Arrays(pairs, images, masks, problems)
    keep = np.flatnonzero(ok)
    return Arrays([pairs[i] for i in keep], images[keep], masks[keep], problems)


def load_split(data=None, split="train", size=256, val_fraction=0.1, test_fraction=0.1,
               cache=None, strict=False, progress=True):
    """Arrays for one split ("train", "val", "test" or "all") of a data folder, or of a list of
    folders, each split by its own rules, one after another in one array (one load_arrays call:
    no second copy of the union); data=None uses the built-in synthetic set, through exactly the
    same code path as real data."""
    if split not in ("train", "val", "test", "all"):
        raise common.Error(split, "unknown split (use train, val, test or all)")
    if data is None:
        from extras import synthetic  # the built-in set, made on first use
        data = synthetic.synthetic_dir(cache=cache or None)
    folders = folders_of(data)
    chosen, problems, spans = [], [], []
    for folder in folders:
        pairs, found, layout = find_pairs(folder, val_fraction, test_fraction)
        if strict and found:
            raise common.Error(found[0]["file"], found[0]["problem"])
        picked = [p for p in pairs if split in ("all", p.split)]
        if not picked and split != "all":  # "all" of a folder of problems: data.py lists them
            counts = {s: sum(p.split == s for p in pairs) for s in ("train", "val", "test")}
            raise common.Error(folder, f"no pairs in split '{split}' ({counts})")
        spans.append((os.path.abspath(folder), layout, picked))
        chosen += picked
        problems += found
    arrays = load_arrays(chosen, size, cache=cache, strict=strict, progress=progress)
    arrays.problems = problems + arrays.problems
    # Skipped pairs shift the rows: count each source's survivors by pair identity.
    kept, start, arrays.sources = {id(p) for p in arrays.pairs}, 0, []
    for path, layout, picked in spans:
        stop = start + sum(id(p) in kept for p in picked)
        arrays.sources.append({"path": path, "layout": layout, "start": start, "stop": stop})
        start = stop
    return arrays


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


# --- Feeding model.fit ----------------------------------------------------------------------------
# The draws of a batch without augmentation: Pillow's convert() matrix and AFFINE coefficients
# that change nothing (extras/augment.py draws the real ones).
NO_COLOUR = np.array([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0], np.float32)
NO_AFFINE = np.array([1, 0, 0, 0, 1, 0], np.float64)


class Batches:
    """x uint8 (B, S, S, 3), y uint8 (B, S, S, 1) in {0, 1}, plain Python that runtime.feed hands
    to keras.utils.PyDataset's worker threads. Batch i of epoch e is a pure function of (seed, e,
    i): order permuted by (seed, epoch), augmentation seeded by (seed, epoch, i); so threads may
    finish in any order, and a resumed run continues the same stream from epoch=. drop_remainder
    keeps training batches full (a partial one means a second compiled step shape and a noisy
    batch-norm update); steps caps the batches per epoch (0: all). part=(i, n): process i of n
    gets the i-th of n equal slices of every batch (draw)."""

    def __init__(self, images, masks, batch_size, augment=True, shuffle=True, seed=0, epoch=0,
                 drop_remainder=False, steps=0, part=(0, 1)):
        self.images, self.masks, self.part = images, masks, part
        self.batch_size, self.augment, self.shuffle, self.seed = batch_size, augment, shuffle, seed
        self.luma = None
        if augment:
            from extras import augment as aug  # on unless --no-augment
            # Contrast's centre, once per image instead of once per batch (docs/benchmarks.md).
            self.luma = aug.mean_luma(images)
        self.start_epoch(epoch)
        n = len(self.order)
        full = drop_remainder and n >= batch_size  # a set smaller than one batch: one partial batch
        self.length = n // batch_size if full else math.ceil(n / batch_size)
        self.length = min(self.length, steps) if steps else self.length

    def epoch_order(self, epoch):
        """The rows of an epoch, in order (extras/sources.py's Balanced draws its own)."""
        n = len(self.images)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle \
            else np.arange(n)

    def start_epoch(self, epoch):
        self.epoch = epoch
        self.order = self.epoch_order(epoch)

    def on_epoch_end(self):
        self.start_epoch(self.epoch + 1)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        """Batch `index`, augmented on the host (Pillow) when augment is on."""
        x, y, colour, affine = self.draw(index)
        if not self.augment:
            return x, y
        from extras import augment as aug
        x, y = aug.warp_pillow(x, y[..., 0], colour, affine)
        return x, y[..., None]

    def draw(self, index):
        """Batch `index` before augmentation's pixel work: (images, masks (B, S, S, 1), colour,
        affine), the draws seeded by (seed, epoch, index) (identity without augment). This is all
        the host does when the accelerator augments (extras/device_augment.py)."""
        idx = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        # The whole batch's draws (their count and order fix the stream), then this process's slice:
        # so n processes together see exactly the stream one process would, batch for batch.
        if self.augment:
            from extras import augment as aug
            rng = np.random.default_rng([self.seed, self.epoch, index])
            shape = (len(idx), *self.images.shape[1:3])
            colour, affine = aug.augment_params(shape, self.luma[idx], rng)
        else:
            colour, affine = np.tile(NO_COLOUR, (len(idx), 1)), np.tile(NO_AFFINE, (len(idx), 1))
        i, n = self.part
        mine = slice(len(idx) * i // n, len(idx) * (i + 1) // n)
        x, y = self.images[idx[mine]], np.asarray(self.masks[idx[mine]], np.uint8)[..., None]
        return x, y, colour[mine], affine[mine]


# --- Command line ---------------------------------------------------------------------------------
def main(argv=None):
    """`python data.py DIR` / `--synthetic OUT`: extras/data_check.py."""
    from extras import data_check
    return data_check.main(argv)


if __name__ == "__main__":
    sys.exit(main())
