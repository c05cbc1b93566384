"""Training data: a data folder's pairs as arrays at the training size (cached on disk),
augmented, in the batches model.fit reads.

    python data.py DIR [--json] [--strict] [--size PX]   # check a data folder, build its cache
    python data.py --synthetic OUT --count N [--seed S] [--width W]   # write a synthetic set

Read top to bottom: arrays at the training size and their cache, augmentation, Batches and the
feed to fit, the command line. The pairs come from layouts.py, the pixels from imaging.py.
No Keras at import (the feed imports it when it is made): `python data.py DIR` answers in a second.
"""
import hashlib
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

import common
import imaging
import layouts


# --- Arrays at the training size, cached ----------------------------------------------------------
@dataclass
class Arrays:
    pairs: list  # the usable pairs, same order as the arrays
    images: np.ndarray  # uint8 (N, S, S, 3)
    masks: np.ndarray  # uint8 (N, S, S) values 0/1
    problems: list  # [{"file", "problem"}] for the pairs that were skipped
    # load_split of several folders: [{"path", "layout", "start", "stop"}], the rows of each folder
    # (images[start:stop] are views, so per-source scores cost no copy); one source otherwise.
    sources: list = None


# The cache is a speed-up, not a step: a run without it gives the same arrays, only slower. One
# entry is a plain .npy of (S, S, 4), RGB plus the mask as a 4th band (plain .npy loads several
# times faster than .npz: docs/data.md), named by a hash of both files' paths, mtimes and sizes.
CACHE_VERSION = 2  # bump when the decode/resize code changes what lands in the cache


def cache_entry(pair, size, folder):
    """The entry's path in `folder`. Any edit, replacement or touch of either file gives a new
    name; stale entries are just unused. A file that cannot be read is one line naming it."""
    parts = [f"v{CACHE_VERSION}", str(size)]
    try:
        for path in (pair.image, pair.mask):
            st = os.stat(path)
            parts += [os.path.abspath(path), str(st.st_mtime_ns), str(st.st_size)]
    except OSError as e:
        raise common.Error(e.filename, f"cannot read ({e.strerror})") from None
    name = hashlib.sha1("|".join(parts).encode()).hexdigest()
    return os.path.join(folder, name[:2], name + ".npy")


def _load_pair(pair, size, folder):
    """(image SxSx3 uint8, mask SxS uint8 0/1) for one pair, from the cache folder when it has it.
    Raises Error naming the bad file."""
    entry = cache_entry(pair, size, folder) if folder else None
    if entry:
        try:
            both = np.load(entry)
            if both.shape == (size, size, 4) and both.dtype == np.uint8:
                return both[..., :3], both[..., 3]
        except (OSError, ValueError):  # missing or damaged: rebuilt below, never fatal
            pass
    image, native = imaging.read_image(pair.image, min_size=(size, size))
    mask = imaging.load_mask(pair.mask)
    if mask.shape != native:
        raise common.Error(pair.mask, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                      f"is {native[1]}x{native[0]}")
    image = imaging.resize_image(image, (size, size))
    mask = imaging.resize_mask(mask, (size, size)).astype(np.uint8)
    if entry:
        try:  # no fsync: an entry damaged by a crash is detected and rebuilt
            common.atomic_write(entry, lambda f: np.save(f, np.dstack([image, mask])),
                                durable=False)
        except OSError:
            pass  # a read-only or full cache only costs speed
    return image, mask


def load_arrays(pairs, size, cache=None, workers=None, strict=False, progress=True):
    """Decode each pair once (draft mode, all cores), squash-resize to size x size, check and cache
    it. Bad pairs are skipped and listed in problems; strict=True raises Error on the first one.
    cache: its folder (None: common.cache_dir()), or False: none.
    Threads, not processes: Pillow and NumPy release the GIL in decode, resize and file reads,
    and threads hand back arrays without pickling them (faster here: docs/benchmarks.md)."""
    pairs = list(pairs)
    folder = None if cache is False else os.path.join(common.cache_dir(cache), f"arrays-{size}")
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
    chosen, problems, spans = [], [], []
    for folder in layouts.data_folders(data, cache=cache or None):
        pairs, found, layout = layouts.find_pairs(folder, val_fraction, test_fraction)
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


# --- Augmentation: the draws in NumPy, the pixel work in Pillow -----------------------------------
# The ranges, the one definition both augmentation paths use (extras/device_augment.py does the
# same pixel work in keras.ops on an accelerator, from the same draws).
ROTATION_DEG = 15           # small rotation, +-, on top of a random flip and 90-degree turn
SCALE = (0.9, 1.1)          # zoom, drawn log-uniformly
SHIFT = 0.06                # translation, +- this fraction of the width / height
HUE_DEG = 10                # +-
SATURATION = (0.8, 1.2)
BRIGHTNESS = (0.85, 1.15)
CONTRAST = (0.8, 1.2)       # around the image's mean luma

# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane, saturation a scaling of it, and Y
# (luma) is left alone, so one 3x3 matrix per image does hue + saturation + brightness.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                       [0.596, -0.274, -0.322],
                       [0.211, -0.523, 0.312]], np.float32)
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ).astype(np.float32)
# The draws of a batch without augmentation: a convert() matrix and AFFINE coefficients that
# change nothing.
NO_COLOUR = np.array([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0], np.float32)
NO_AFFINE = np.array([1, 0, 0, 0, 1, 0], np.float64)


def _affine(rng, h, w):
    """Pillow AFFINE coefficients (output pixel -> input pixel) of a random flip, 90-degree
    rotation, small rotation, scale and shift, about the centre."""
    flip = np.diag([-1.0 if rng.random() < 0.5 else 1.0, 1.0])
    k = rng.integers(0, 4)
    rot90 = np.array([[0.0, -1.0], [1.0, 0.0]]) if k % 2 else np.eye(2)
    rot90 = rot90 * (-1.0 if k >= 2 else 1.0)
    a = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    scale = np.exp(rng.uniform(*np.log(SCALE)))
    small = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * scale
    forward = small @ rot90 @ flip  # input -> output about the centre
    shift = rng.uniform(-SHIFT, SHIFT, 2) * (w, h)
    inv = np.linalg.inv(forward)
    centre = np.array([w / 2, h / 2])
    offset = centre - inv @ (centre + shift)
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


def mean_luma(images):
    """Mean luma (Y of YIQ) of each image, from every 4th pixel in each direction: contrast's
    centre. Batches works it out once per image. numpy reduces the strided view in buffered
    pieces, so no whole-set temporary is made (sums of uint8 in float64 are exact)."""
    return images[:, ::4, ::4].mean(axis=(1, 2)) @ RGB_TO_YIQ[0]


def _colour(rng, luma):
    """Per-image colour jitter as Pillow convert() matrices (12 numbers: 3x3 + offset): hue,
    saturation, brightness, and contrast around the image's mean luma. Hue and saturation act on
    the chroma plane of YIQ only, so gray stays gray."""
    n = len(luma)
    hue = np.deg2rad(rng.uniform(-HUE_DEG, HUE_DEG, n))
    sat = rng.uniform(*SATURATION, n)
    bright, contrast = rng.uniform(*BRIGHTNESS, n), rng.uniform(*CONTRAST, n)
    chroma = np.zeros((n, 3, 3), np.float32)
    chroma[:, 0, 0] = 1
    chroma[:, 1, 1], chroma[:, 1, 2] = sat * np.cos(hue), -sat * np.sin(hue)
    chroma[:, 2, 1], chroma[:, 2, 2] = sat * np.sin(hue), sat * np.cos(hue)
    matrix = (bright * contrast)[:, None, None] * (YIQ_TO_RGB @ chroma @ RGB_TO_YIQ)
    offset = np.repeat(((1 - contrast) * bright * luma)[:, None, None], 3, axis=1)
    return np.concatenate([matrix, offset], axis=2).reshape(n, 12)


def augment_params(shape, luma, rng, geometric=True, photometric=True):
    """The random draws of a batch of `shape` (B, H, W) whose images have mean_luma `luma`: (colour
    (B, 12) float32 convert() matrices, affine (B, 6) float64 AFFINE coefficients); a part switched
    off is the identity. Drawn in the same order since the first release, so a seed gives the same
    augmentation as it always has."""
    n, h, w = shape
    colour = _colour(rng, luma).astype(np.float32) if photometric else np.tile(NO_COLOUR, (n, 1))
    if geometric:
        affine = np.array([_affine(rng, h, w) for _ in range(n)])
    else:
        affine = np.tile(NO_AFFINE, (n, 1))
    return colour, affine.reshape(n, 6)


def augment_batch(images, masks, rng, geometric=True, photometric=True):
    """Augment a batch on the host: colour jitter on the images only, then the same random affine
    on each image and its mask, so masks stay binary (bilinear on 0/255, then > 127) and aligned.
    images uint8 (B, H, W, 3), masks bool or 0/1 (B, H, W); returns new arrays, same dtypes."""
    images = np.asarray(images, np.uint8)
    luma = mean_luma(images) if photometric else None
    params = augment_params(images.shape[:3], luma, rng, geometric, photometric)
    return warp_pillow(images, masks, *params)


def warp_pillow(images, masks, colour, affine):
    """augment_batch's pixel work, given its draws: two Pillow C calls per image. They release
    the GIL, but the Python around them does not, so worker threads stop scaling after a few
    (docs/benchmarks.md): extras/device_augment.py is the accelerator's path."""
    masks = np.asarray(masks)
    n, h, w = masks.shape
    masks255 = np.where(masks > 0, np.uint8(255), np.uint8(0))
    out_images, out_masks = np.empty_like(images), np.empty((n, h, w), np.uint8)
    for i in range(n):
        rgb = Image.fromarray(images[i])
        if not np.array_equal(colour[i], NO_COLOUR):
            rgb = rgb.convert("RGB", tuple(colour[i]))
        # The mask rides along as a 4th band, so one resampling pass moves image and mask with
        # identical geometry. "CMYK" is just Pillow's plain 4 x 8-bit mode here; RGBA would
        # premultiply the colours by the mask.
        pil = Image.merge("CMYK", [*rgb.split(), Image.fromarray(masks255[i])])
        if not np.array_equal(affine[i], NO_AFFINE):
            pil = pil.transform((w, h), Image.AFFINE, tuple(affine[i]), Image.BILINEAR)
        *bands, mask = pil.split()
        out_images[i], out_masks[i] = np.asarray(Image.merge("RGB", bands)), np.asarray(mask)
    return out_images, (out_masks > 127).astype(masks.dtype)


# --- Feeding model.fit ----------------------------------------------------------------------------
class Batches:
    """x uint8 (B, S, S, 3), y uint8 (B, S, S, 1) in {0, 1}, plain Python that feed() hands to
    keras.utils.PyDataset's worker threads. Batch i of epoch e is a pure function of (seed, e, i):
    order permuted by (seed, epoch), augmentation seeded by (seed, epoch, i); so threads may
    finish in any order, and a resumed run continues the same stream from epoch=. drop_remainder
    keeps training batches full (a partial one means a second compiled step shape and a noisy
    batch-norm update); steps caps the batches per epoch (0: all). part=(i, n): process i of n
    gets the i-th of n equal slices of every batch (draw)."""

    def __init__(self, images, masks, batch_size, augment=True, shuffle=True, seed=0, epoch=0,
                 drop_remainder=False, steps=0, part=(0, 1)):
        self.images, self.masks, self.part = images, masks, part
        self.batch_size, self.augment, self.shuffle, self.seed = batch_size, augment, shuffle, seed
        # Contrast's centre, once per image instead of once per batch (docs/benchmarks.md).
        self.luma = mean_luma(images) if augment else None
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
        x, y = warp_pillow(x, y[..., 0], colour, affine)
        return x, y[..., None]

    def draw(self, index):
        """Batch `index` before augmentation's pixel work: (images, masks (B, S, S, 1), colour,
        affine), the draws seeded by (seed, epoch, index) (identity without augment). This is all
        the host does when the accelerator augments (extras/device_augment.py)."""
        idx = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        # The whole batch's draws (their count and order fix the stream), then this process's slice:
        # so n processes together see exactly the stream one process would, batch for batch.
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            shape = (len(idx), *self.images.shape[1:3])
            colour, affine = augment_params(shape, self.luma[idx], rng)
        else:
            colour, affine = np.tile(NO_COLOUR, (len(idx), 1)), np.tile(NO_AFFINE, (len(idx), 1))
        i, n = self.part
        mine = slice(len(idx) * i // n, len(idx) * (i + 1) // n)
        x, y = self.images[idx[mine]], np.asarray(self.masks[idx[mine]], np.uint8)[..., None]
        return x, y, colour[mine], affine[mine]


def feed(batches, workers, get=None):
    """Batches as a keras.utils.PyDataset: fit's worker threads call batches[i] in parallel
    (augmentation is Pillow C code that releases the GIL, and threads share the arrays for free).
    get(i): batch i another way (extras/device_augment.py: warped on the accelerator)."""
    import keras
    get = get or batches.__getitem__

    class Feed(keras.utils.PyDataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, index):
            return get(index)

        def on_epoch_end(self):
            batches.on_epoch_end()

    return Feed(workers=workers, max_queue_size=16)


# --- Command line: check a data folder, or write a synthetic set ----------------------------------
@common.command
def main(argv=None):
    """`python data.py DIR` / `--synthetic OUT`. Its flags and its report are extras/data_check.py
    (what no training run needs); the arrays are built here, as train.py builds them."""
    from extras import data_check

    args = data_check.parse(argv)
    if args.synthetic:
        return data_check.write_synthetic(args)
    arrays = load_split(args.dir, "all", args.size, args.val_fraction, args.test_fraction,
                        cache=args.cache, strict=args.strict,
                        progress=not args.json and sys.stderr.isatty())
    return data_check.report(args, arrays)


if __name__ == "__main__":
    sys.exit(main())
