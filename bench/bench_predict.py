"""predict.py on a photo archive: photos/s, peak memory, and a rerun that has nothing left to do.

    python bench/make_archive.py /tmp/isic2024-like.hdf5 --photos 20000
    python bench/bench_predict.py --weights models/skin_unet_int8.tflite /tmp/isic2024-like.hdf5

Each DATA (a folder of photos, a data folder, an HDF5 archive) is run through `python predict.py`
exactly as a user runs it, in a child process into a fresh folder under /tmp (removed afterwards):
first the whole set, then the same command again, which must skip every photo. photos/s is over
the whole child; "after start-up" over the time predict.py itself reports for the photos (imports
and the model load left out). Peak RSS is the child's (getrusage), so it counts the runtime and
the model too; comparing sets of different sizes shows whether memory grows with the photos.
Outputs are predict.py's defaults (overlays for folders, not for archives) unless --no-overlay.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from machine import cpu_line  # noqa: E402  (the CPU every benchmark names)

import common  # noqa: E402
import predict  # noqa: E402


def run(cmd):
    """(seconds, peak RSS in MB, stdout) of one child process: wait4 gives that child's own usage."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if status:
        sys.exit(f"error: {' '.join(cmd)} failed: {stderr.strip().splitlines()[-1] if stderr.strip() else status}")
    return seconds, usage.ru_maxrss / 1024, stdout  # ru_maxrss is in KiB on Linux


@common.command  # a bad model or data folder: one line, not a traceback
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("data", nargs="+")
    p.add_argument("--no-overlay", action="store_true")
    args = p.parse_args(argv)
    for source in args.data:
        if not os.path.exists(source):
            sys.exit(f"error: {source}: not found")
    print(f"{cpu_line()}; model {args.weights}")
    print("| data | photos | first run s | photos/s | after start-up | peak RSS MB | rerun s (all skipped) |")
    print("|---|---|---|---|---|---|---|")
    for source in args.data:
        photos = len(predict.find_photos(source))
        out = tempfile.mkdtemp(prefix="bench-predict-", dir="/tmp")
        try:
            cmd = [sys.executable, os.path.join(ROOT, "predict.py"), "--weights", args.weights, "--data", source,
                   "--out", out, "--no-progress", *(["--no-overlay"] if args.no_overlay else [])]
            first, peak_mb, stdout = run(cmd)
            seconds = float(re.search(r"predicted \d+ .* in ([\d.]+)s", stdout).group(1))
            again, _, stdout = run(cmd)
            if "already done" not in stdout:
                sys.exit(f"error: the rerun did not skip the finished photos: {stdout.strip()}")
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print(f"| {source} | {photos} | {first:.1f} | {photos / first:.1f} | {photos / seconds:.1f} | {peak_mb:.0f} "
              f"| {again:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
