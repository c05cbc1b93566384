"""Photo archives for predict.py: the ISIC 2024 (SLICE-3D) HDF5 file, and resuming a long run.

    python predict.py --weights best.keras --data isic2024/train-image.hdf5 --out masks/

An --data ending in .hdf5 or .h5 brings in find_photos and Reader: the archive holds one dataset of
JPEG bytes per isic_id, and each photo is named "<archive>:<isic_id>" in predictions.csv and in
error lines. A rerun into an --out that already holds a predictions.csv (without --overwrite)
brings in finished: it keeps the rows an earlier run finished, so that run's photos are skipped.
h5py comes with TensorFlow; only an archive imports it.
"""
import csv
import os

import numpy as np

import common


def find_photos(source):
    """[(isic_id, "<source>:<isic_id>")] for every dataset in the archive, sorted."""
    import h5py

    try:
        with h5py.File(source, "r") as f:
            keys = sorted(k for k, v in f.items() if isinstance(v, h5py.Dataset))
    except OSError as e:
        raise common.Error(source, f"not a readable HDF5 file ({common.one_line(e)})") from None
    if not keys:
        raise common.Error(source, "no datasets (expected one dataset of image bytes per id)")
    return [(key, f"{source}:{key}") for key in keys]


class Reader:
    """The encoded bytes of "<archive>:<key>" photos, for the pipeline's one decoder thread: each
    archive is opened once and read from that thread only."""

    def __init__(self):
        self.archives = {}

    def raw(self, file):
        archive, _, key = file.rpartition(":")
        if archive not in self.archives:
            import h5py
            self.archives[archive] = h5py.File(archive, "r")
        value = self.archives[archive][key][()]
        if isinstance(value, bytes):
            return value
        if isinstance(value, (np.ndarray, np.generic)):  # uint8 arrays, opaque (np.void) scalars
            return value.tobytes()
        raise common.Error(file, "the dataset holds no image bytes")  # h5py.Empty, say

    def close(self):
        for f in self.archives.values():
            f.close()


def finished(out, csv_path, columns):
    """The ids an earlier run finished (mask written and row in predictions.csv), after dropping the
    rows it cannot vouch for: a last line cut short by a kill, and rows whose mask is gone."""
    try:
        with open(csv_path, newline="") as f:
            lines = f.readlines()
    except UnicodeDecodeError:  # (saved as UTF-16 by a spreadsheet, say): not ours, as below
        lines = []
    header = lines[0].rstrip("\n").split(",") if lines else []
    if header and header == list(columns)[:len(header)] and "uncertainty" in columns[len(header):]:
        raise common.Error(csv_path, "written by an older predict.py, without the uncertainty and "
                                     "review columns; --overwrite redoes its photos")
    if header != list(columns):
        raise common.Error(csv_path, "not a predictions.csv of this command; choose another "
                                     "--out, or --overwrite")
    kept, done = [lines[0]], set()
    for line in lines[1:]:
        image_id = next(csv.reader([line]), [""])[0]
        mask = os.path.join(out, f"{image_id}_segmentation.png")
        if line.endswith("\n") and os.path.exists(mask):
            kept.append(line)
            done.add(image_id)
    if len(kept) < len(lines):
        common.atomic_write(csv_path, lambda f: f.write("".join(kept).encode()))
    return done
