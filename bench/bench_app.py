"""app.py latency per model format, and app.py under load: what a busy server costs.

    python bench/bench_app.py [--weights best.keras] [--image PHOTO] [--runs 5] [--no-http]
    python bench/bench_app.py --load [--clients 8] [--seconds 60] [--calls N] [--slides 2]
                              [--image PHOTO | --megapixels 50] [--weights best.keras]

Without --weights it builds an untrained unet.build_unet(256) (the latency does not depend on the
weights). The photo is --image, or a synthetic JPEG of 1024 x 768 (--megapixels M: a grayscale PNG
of M megapixels, a worst case for memory: PNG has no reduced-scale decode).

Latency (the default): it exports that model once with export.py (SavedModel, float32 and int8
.tflite) into a temp folder and times, for each format:
  analyse  app.analyse() in this process: decode, model, native-size mask, overlay, the three PNGs
  slider   app.rerender(): a new threshold, no model
  http     the same upload through the running server's HTTP API (gradio_client), i.e. what a
           visitor waits for minus the browser's drawing; one `python app.py` per format
Medians of --runs after one warm-up.

--load: one `python app.py` on 127.0.0.1 (its temp folder a fresh one, so its size is the app's),
then --clients visitors at once, each its own session: upload the photo, move the slider --slides
times, again, until --seconds pass or --calls calls are done. A call is timed from the request to
the last output file downloaded. It prints p50/p95 latency per kind of call, the errors, the
server's RSS and peak RSS (Linux /proc) and its folder's size, before (after one warm-up call with
a small photo) and after, and RSS again after --idle seconds. Nothing listens beyond 127.0.0.1.
"""
import argparse
import glob
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from machine import cpu_line  # noqa: E402  (the CPU every benchmark names)

import app  # noqa: E402
import common  # noqa: E402
import imaging  # noqa: E402
import inference  # noqa: E402
from extras import synthetic  # noqa: E402


def median_ms(fn, runs):
    fn()  # warm-up: first-call tracing, caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weights, tmp=None):
    """(process, url, start-up s) of `python app.py --weights ...` on 127.0.0.1 once it answers;
    `tmp` becomes its TMPDIR, so the app's folder lands there."""
    env = {**os.environ, "TMPDIR": tmp} if tmp else None
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "app.py"), "--weights", weights,
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return proc, url, time.perf_counter() - started
        except OSError:
            if proc.poll() is not None or time.perf_counter() - started > 300:
                proc.kill()
                raise RuntimeError(f"app.py --weights {weights} did not start") from None
            time.sleep(0.25)


def client(url, downloads):
    from gradio_client import Client
    # gradio_client's 5 s default is shorter than a 50 Mpx upload on a busy 2-core machine.
    return Client(url, verbose=False, download_files=downloads, httpx_kwargs={"timeout": 600})


def http_ms(weights, photo, runs, work):
    """(start-up s, median ms per upload) through a real `python app.py` and gradio_client."""
    from gradio_client import handle_file

    proc, url, startup = start_server(weights)
    try:
        visitor = client(url, os.path.join(work, "downloads"))
        ms = median_ms(lambda: visitor.predict(handle_file(photo), 0.5, api_name="/analyse"), runs)
        visitor.close()
        return startup, ms
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def export(weights, out):
    subprocess.run([sys.executable, os.path.join(REPO, "export.py"), "--weights", weights,
                    "--out", out, "--threads", "1", "--bench-runs", "1"], check=True,
                   stdout=subprocess.DEVNULL)
    models = [("SavedModel", d) for d in glob.glob(os.path.join(out, "**", "saved_model.pb"),
                                                   recursive=True)]
    models = [(name, os.path.dirname(p)) for name, p in models]
    for path in sorted(glob.glob(os.path.join(out, "*.tflite"))):
        models.append((os.path.basename(path), path))
    return models


def latency(args, weights, photo, work):
    h, w = imaging.native_hw(photo)
    models = [(os.path.basename(weights), weights)]
    if not args.no_export:
        try:
            models += export(weights, os.path.join(work, "export"))
        except subprocess.CalledProcessError as e:
            print(f"export.py failed ({e}); timing the .keras only", file=sys.stderr)
    rows = []
    for name, path in models:
        predictor = app.LockedPredictor(inference.load_predictor(path))
        photos = app.Photos(os.path.join(work, "photos"), limit=1)  # each call forgets the last
        analyse = median_ms(lambda: app.analyse(predictor, photo, 0.5, photos), args.runs)
        state = app.analyse(predictor, photo, 0.5, photos)[4]
        slider = median_ms(lambda: app.rerender(state, 0.3, photos), args.runs)
        startup, http = (None, None) if args.no_http else http_ms(path, photo, args.runs, work)
        rows.append((name, predictor.size, app.model_megabytes(path), analyse, slider,
                     startup, http))
        print(f"  done {name}", file=sys.stderr, flush=True)

    print(f"\n{cpu_line()}; photo {w} x {h} px, median of {args.runs} runs\n")
    print("| model | input | MB | analyse() ms | slider ms | server start s | HTTP upload ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, size, mb, analyse, slider, startup, http in rows:
        print(f"| {name} | {size} | {mb:.1f} | {analyse:.0f} | {slider:.0f} | "
              + (f"{startup:.1f} | {http:.0f} |" if http is not None else "- | - |"))


# ----------------------------------------------------------------------------------------------
# --load


def memory_mb(pid):
    """(RSS, peak RSS) of a process in MB (10**6 bytes), from /proc: Linux only."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / 1e6
    return fields["VmRSS"], fields["VmHWM"]


def folder_mb(folder):
    """(MB, files) under a folder."""
    sizes = [os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(folder) for name in names]
    return sum(sizes) / 1e6, len(sizes)


def percentile_ms(seconds, q):
    return 1000 * float(np.percentile(seconds, q)) if seconds else float("nan")


def load(args, weights, photo, work):
    """Concurrent visitors against one server; prints the table's row and returns its numbers."""
    from gradio_client import handle_file

    server_tmp = os.path.join(work, "server-tmp")
    os.makedirs(server_tmp)
    proc, url, _ = start_server(weights, server_tmp)
    try:
        warm = os.path.join(work, "warm.jpg")
        Image.fromarray(synthetic.make_synthetic(1, seed=1)[0][0]).save(warm, quality=92)
        first = client(url, os.path.join(work, "downloads", "warm"))
        first.predict(handle_file(warm), 0.5, api_name="/analyse")  # the model's first call
        first.close()
        before = memory_mb(proc.pid)[0], folder_mb(server_tmp)

        times = {"analyse": [], "slider": []}
        errors, lock = [], threading.Lock()
        budget = [args.calls or float("inf")]
        deadline = time.monotonic() + args.seconds

        def take():
            with lock:
                budget[0] -= 1
                return budget[0] >= 0 and time.monotonic() < deadline

        def timed(kind, call):
            start = time.perf_counter()
            try:
                call()
                with lock:
                    times[kind].append(time.perf_counter() - start)
            except Exception as e:  # a failed call is a result here, not the end of the run
                with lock:
                    errors.append(f"{kind}: {type(e).__name__}: {common.one_line(e)[:150]}")

        def visitor(i):
            me = client(url, os.path.join(work, "downloads", str(i)))
            try:
                while take():
                    timed("analyse", lambda: me.predict(handle_file(photo), 0.5,
                                                        api_name="/analyse"))
                    for k in range(args.slides):
                        if not take():
                            return
                        timed("slider", lambda: me.predict(0.3 + 0.05 * k, api_name="/rerender"))
            finally:
                me.close()

        started = time.monotonic()
        threads = [threading.Thread(target=visitor, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        rss, peak = memory_mb(proc.pid)
        after = rss, folder_mb(server_tmp)
        time.sleep(args.idle)
        idle = memory_mb(proc.pid)[0]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    left = os.listdir(server_tmp)

    h, w = imaging.native_hw(photo)
    calls = len(times["analyse"]) + len(times["slider"]) + len(errors)
    print(f"\n{cpu_line()}; {os.path.basename(weights)}; photo {w} x {h} px "
          f"({os.path.getsize(photo) / 1e6:.1f} MB); {args.clients} clients, {calls} calls in "
          f"{elapsed:.0f} s; left in its TMPDIR after SIGTERM: {left or 'nothing'}\n")
    print("| clients | calls | analyse p50 / p95 ms | slider p50 / p95 ms | errors | RSS MB before "
          "→ after (peak; after idle) | folder MB (files) before → after |")
    print("|---:|---:|---:|---:|---:|---|---|")
    print(f"| {args.clients} | {calls} | {percentile_ms(times['analyse'], 50):.0f} / "
          f"{percentile_ms(times['analyse'], 95):.0f} | {percentile_ms(times['slider'], 50):.0f} / "
          f"{percentile_ms(times['slider'], 95):.0f} | {len(errors)} | {before[0]:.0f} → "
          f"{after[0]:.0f} ({peak:.0f}; {idle:.0f}) | {before[1][0]:.1f} ({before[1][1]}) → "
          f"{after[1][0]:.1f} ({after[1][1]}) |")
    for error in errors[:5]:
        print(f"  {error}")
    return {"rss": (before[0], after[0], peak, idle), "folder": (before[1], after[1]),
            "errors": errors, "times": times}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="a .keras model (default: untrained 256 px U-Net)")
    parser.add_argument("--image", help="photo to upload (default: synthetic 1024x768 JPEG)")
    parser.add_argument("--megapixels", type=float,
                        help="instead of --image: a synthetic grayscale PNG of this size")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-http", action="store_true", help="skip the server round trips")
    parser.add_argument("--no-export", action="store_true", help="time the .keras only")
    parser.add_argument("--load", action="store_true", help="concurrent visitors, one server")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--calls", type=int, default=0, help="stop after this many (0: --seconds)")
    parser.add_argument("--slides", type=int, default=2, help="slider calls after each upload")
    parser.add_argument("--idle", type=float, default=10, help="seconds before the last RSS")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench-app-")
    try:
        weights = args.weights
        if weights is None:
            common.import_keras()
            import unet
            weights = os.path.join(work, "unet256.keras")
            unet.build_unet(256).save(weights)
        photo = args.image
        if photo is None and args.megapixels:
            side = (args.megapixels * 1e6 / 12) ** 0.5  # 4:3
            w, h = int(4 * side), int(3 * side)
            photo = os.path.join(work, f"photo{w}x{h}.png")
            image = synthetic.make_synthetic(1, seed=0, size_wh=(1024, 768))[0][0]
            Image.fromarray(image).convert("L").resize((w, h), Image.BILINEAR).save(photo)
        elif photo is None:
            photo = os.path.join(work, "photo.jpg")
            image = synthetic.make_synthetic(1, seed=0, size_wh=(1024, 768))[0][0]
            Image.fromarray(image).save(photo, "JPEG", quality=92)
        if args.load:
            load(args, weights, photo, work)
        else:
            latency(args, weights, photo, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
