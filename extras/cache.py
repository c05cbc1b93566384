"""The on-disk cache of resized arrays: a speed-up, not a step. data.load_arrays decodes each pair
and squashes it to the training size once, then reads it back from here (unless cache=False); a
run without it gives the same arrays, only slower. One entry is one plain .npy of (S, S, 4): RGB
plus the mask as a 4th band (plain .npy loads several times faster than .npz: docs/data.md).

The folder: train.py's and data.py's --cache, else $SKIN_UNET_CACHE, else ~/.cache/skin-unet;
never inside the data folder, which may be read-only. The built-in synthetic set lives there too.
"""
import hashlib
import os

import numpy as np

import common

VERSION = 2  # bump when the decode/resize code changes what lands in the cache


def cache_dir(default=None):
    """$SKIN_UNET_CACHE, else `default`, else ~/.cache/skin-unet."""
    return (os.environ.get("SKIN_UNET_CACHE") or default
            or os.path.join(os.path.expanduser("~"), ".cache", "skin-unet"))


def folder(cache, size):
    """Where the entries of one training size live."""
    return os.path.join(cache or cache_dir(), f"arrays-{size}")


def key(pair, size):
    """Identity of an entry: absolute paths, mtimes, byte sizes and the target size. Any edit,
    replacement or touch of either file gives a new key; stale entries are just unused."""
    parts = [f"v{VERSION}", str(size)]
    for path in (pair.image, pair.mask):
        st = os.stat(path)
        parts += [os.path.abspath(path), str(st.st_mtime_ns), str(st.st_size)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def entry(pair, size, where):
    """The entry's path in the folder `where`; a file that cannot be read is one line naming it."""
    try:
        name = key(pair, size)
    except OSError as e:
        raise common.Error(e.filename, f"cannot read ({e.strerror})") from None
    return os.path.join(where, name[:2], name + ".npy")


def read(path, size):
    """(image, mask) from an entry, or None: missing or damaged entries are rebuilt, never fatal."""
    try:
        both = np.load(path)
    except (OSError, ValueError):
        return None
    if both.shape != (size, size, 4) or both.dtype != np.uint8:
        return None
    return both[..., :3], both[..., 3]


def write(path, image, mask):
    try:
        # No fsync: an entry damaged by a crash is detected and rebuilt.
        common.atomic_write(path, lambda f: np.save(f, np.dstack([image, mask])), durable=False)
    except OSError:
        pass  # a read-only or full cache only costs speed
