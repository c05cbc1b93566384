"""app.py latency: upload to result, per model format, at the model's input size (256 px default).

    python bench/bench_app.py [--weights best.keras] [--image PHOTO] [--runs 5] [--no-http]

Without --weights it builds an untrained unet.build_unet(256) (the latency does not depend on the
weights). It exports that model once with export.py (SavedModel, float32 and int8 .tflite) into a
temp folder and times, for each format:
  analyse  app.analyse() in this process: decode, model, native-size map, overlay, mask PNG
  slider   app.rerender(): a new threshold, no model
  http     the same upload through the running server's HTTP API (gradio_client), i.e. what a
           visitor waits for minus the browser's drawing; one `python app.py` per format
The photo is --image or a synthetic 1024 x 768 JPEG. Medians of --runs after one warm-up.
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
import time
import urllib.request

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import app  # noqa: E402
import data  # noqa: E402


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


def http_ms(weights, photo, runs):
    """(start-up s, median ms per upload) through a real `python app.py` and gradio_client."""
    from gradio_client import Client, handle_file

    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "app.py"), "--weights", weights,
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - started > 300:
                    raise RuntimeError(f"app.py --weights {weights} did not start")
                time.sleep(0.25)
        startup = time.perf_counter() - started
        client = Client(url, verbose=False)
        ms = median_ms(lambda: client.predict(handle_file(photo), 0.5, api_name="/analyse"), runs)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="a .keras model (default: untrained 256 px U-Net)")
    parser.add_argument("--image", help="photo to upload (default: synthetic 1024x768 JPEG)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-http", action="store_true", help="skip the server round trips")
    parser.add_argument("--no-export", action="store_true", help="time the .keras only")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench-app-")
    try:
        weights = args.weights
        if weights is None:
            keras = data.import_keras()  # noqa: F841
            import unet
            weights = os.path.join(work, "unet256.keras")
            unet.build_unet(256).save(weights)
        photo = args.image
        if photo is None:
            photo = os.path.join(work, "photo.jpg")
            image = data.make_synthetic(1, seed=0, size_wh=(1024, 768))[0][0]
            Image.fromarray(image).save(photo, "JPEG", quality=92)
        h, w = data.load_image(photo).shape[:2]

        models = [(os.path.basename(weights), weights)]
        if not args.no_export:
            try:
                models += export(weights, os.path.join(work, "export"))
            except subprocess.CalledProcessError as e:
                print(f"export.py failed ({e}); timing the .keras only", file=sys.stderr)

        import evaluate
        rows = []
        for name, path in models:
            predictor = app.LockedPredictor(evaluate.load_predictor(path))
            masks = os.path.join(work, "masks")
            result = app.analyse(predictor, photo, 0.5, masks)
            state = result[4]
            analyse = median_ms(lambda: app.analyse(predictor, photo, 0.5, masks), args.runs)
            slider = median_ms(lambda: app.rerender(state, 0.3, masks), args.runs)
            startup, http = (None, None) if args.no_http else http_ms(path, photo, args.runs)
            rows.append((name, predictor.size, app.model_megabytes(path), analyse, slider,
                         startup, http))
            print(f"  done {name}", file=sys.stderr, flush=True)

        print(f"\nphoto {w} x {h} px, {os.cpu_count()} CPU cores, median of {args.runs} runs\n")
        print("| model | input | MB | analyse() ms | slider ms | server start s | HTTP upload ms |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, size, mb, analyse, slider, startup, http in rows:
            print(f"| {name} | {size} | {mb:.1f} | {analyse:.0f} | {slider:.0f} | "
                  + (f"{startup:.1f} | {http:.0f} |" if http is not None else "- | - |"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
