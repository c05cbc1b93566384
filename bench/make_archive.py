"""An ISIC-2024-like photo archive for bench_predict.py: small JPEGs in one HDF5 file, one scalar
of JPEG bytes per isic_id, as the SLICE-3D challenge ships its 401,059 photos.

    python bench/make_archive.py /tmp/isic2024-like.hdf5 --photos 20000

The photos come from ../shared/data (HAM10000 and ISIC 2018 dermoscopy, never committed), each
resized to a side of 125-141 px (the challenge's 15 x 15 mm crops are about 133 px) and saved as a
quality-90 JPEG; after the last source photo the list starts again mirrored, under new ids. Written
to a temp file and renamed.
"""
import argparse
import io
import os
import sys

import numpy as np
from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import imaging  # noqa: E402

SOURCES = [os.path.join(ROOT, "..", "shared", "data", name) for name in (
    "ham10000/HAM10000_images_part_1", "ham10000/HAM10000_images_part_2",
    "isic2018/ISIC2018_Task1-2_Training_Input")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--photos", type=int, default=20000)
    args = p.parse_args(argv)
    import h5py

    files = sorted(f for folder in SOURCES if os.path.isdir(folder)
                   for f in imaging.image_files(folder))
    if not files:
        sys.exit("error: ../shared/data: no HAM10000 or ISIC 2018 photos found")
    rng = np.random.default_rng(0)
    with common.atomic_path(args.out, ".hdf5") as tmp, h5py.File(tmp, "w") as f:
        for i in range(args.photos):
            image = Image.open(files[i % len(files)]).convert("RGB")
            if (i // len(files)) % 2:
                image = ImageOps.mirror(image)
            side = int(rng.integers(125, 142))
            buffer = io.BytesIO()
            image.resize((side, side), Image.BILINEAR).save(buffer, "JPEG", quality=90)
            f.create_dataset(f"ISIC_{9000000 + i:07d}", data=np.void(buffer.getvalue()))
    print(f"wrote {args.out}: {args.photos} photos from {len(files)} source photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
