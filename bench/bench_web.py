"""web/, the phone page, in headless Chromium on this machine: its time per model call and per photo
beside Python LiteRT's on the same file, the bytes a first visit downloads, and how its masks and
review flags agree with predict.py's on real photos.

    npm ci --prefix web
    python bench/bench_web.py [--data ../shared/data/isic2018] [--photos 50] [--runs 20]
                              [--float export/model_float32.tflite]
                              [--ort DIR --onnx export/] [--stages] [--screenshot docs/web.jpg]

The repository root is served as a plain static server serves it (no headers added). Two
visitors: a first visit in a fresh browser profile, which web/sw.js reloads once into cross-origin
isolation, so the threaded build runs (threads: min(cores, 4)); its bytes are what a phone downloads
on a first visit. And one with service workers blocked: never isolated, so one thread.
Per visitor: the median of --runs model calls after 3 warm-up calls (window.skinUnet.timeCalls, a
fixed 128 px input: Tensor in, model, uint8 map out), and the median time per photo of --photos
photos from --data (every JPEG under it, sorted; the page's own clock from the picked file to the
drawn outline: decode, resize, model, overlay, native-size area).
Python LiteRT: the same int8 file, median of --runs invokes after 3, at 1 and 2 threads
(export.tflite_ms, the timer behind export.py's report).
Agreement: predict.py --weights models/skin_unet_int8.tflite on the same photos; per photo the
Dice of the page's native-size mask (its model output resized exactly as the page resizes it,
tests/test_web.py) with predict.py's, the review flag, and the uncertainty.
--float FILE: that float32 .tflite in the page's LiteRT.js, one thread (what int8 gains there).
--stages: models/skin_unet.keras cut after each stage and converted to int8 as export.py does
(TensorFlow needed): the ms each stage adds, in the page (one thread) and in Python LiteRT.
--ort DIR: onnxruntime-web from DIR/node_modules (npm install --prefix DIR onnxruntime-web@1.31.1),
timing model.onnx and model_int8.onnx from --onnx at 1 thread, and at 2 on an isolated server.
"""
import argparse
import functools
import glob
import gzip
import http.server
import os
import statistics
import subprocess
import sys
import tempfile
import threading

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from machine import cpu_line  # noqa: E402  (the CPU every benchmark names)

import imaging  # noqa: E402

INT8 = os.path.join(ROOT, "models", "skin_unet_int8.tflite")
CHROMIUM = "/usr/bin/chromium"


def serve(extra=None, isolate=False):
    """The repository root over plain HTTP, as `python -m http.server` serves it (plus extra {url
    prefix: folder}, and with isolate the two isolation headers), counting the bytes of each file
    sent: (server, origin, {path: bytes}). tests/test_web.py serves the page with it too."""
    sent = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def translate_path(self, path):
            for prefix, folder in (extra or {}).items():
                if path.startswith(prefix):
                    return os.path.join(folder, path[len(prefix):].split("?")[0])
            return super().translate_path(path)

        def end_headers(self):
            if isolate:
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            super().end_headers()

        def copyfile(self, source, outputfile):
            path = self.translate_path(self.path)
            path = os.path.join(path, "index.html") if os.path.isdir(path) else path
            sent[path] = sent.get(path, 0) + os.fstat(source.fileno()).st_size
            super().copyfile(source, outputfile)

    handler = functools.partial(Handler, directory=ROOT)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", sent


def page_visit(page, url, photos, runs):
    page.goto(url)
    page.wait_for_selector("body[data-ready]", state="attached")  # after the first visit's reload
    assert page.evaluate("window.skinUnet.ready"), page.text_content("#status")
    figures = {"threads": page.evaluate("window.skinUnet.state.threads"),
               "isolated": page.evaluate("self.crossOriginIsolated"),
               "call_ms": page.evaluate(f"window.skinUnet.timeCalls({runs})"), "photos": []}
    for path in photos:
        page.set_input_files("[data-testid=photo]", path)
        page.wait_for_function("window.skinUnet.state.photo && window.skinUnet.state.photo.ms"
                               " && window.skinUnet.state.photo.name === " + repr(os.path.basename(path)))
        figures["photos"].append(page.evaluate("""() => { const p = window.skinUnet.state.photo;
            return {name: p.name, ms: p.ms, output: Array.from(p.output), width: p.width,
                    height: p.height, uncertainty: p.uncertainty, review: p.review}; }"""))
    return figures


def python_litert(runs, threads, path=INT8):
    """Python LiteRT's median ms per invoke: export.py's timer, the figure its report gives."""
    import export

    return export.tflite_ms(path, threads, runs)


def tflite_in_page(page, url, runs):
    """Median ms of a .tflite (uint8 or float32 input) in the page's own LiteRT.js, its threads."""
    return page.evaluate("""async ([url, runs]) => {
        const lrt = await import("./node_modules/@litertjs/core/dist/index.js");
        const model = await lrt.loadAndCompile(url, {accelerator: "wasm",
            cpuOptions: {numThreads: window.skinUnet.state.threads}});
        const [d] = model.getInputDetails();
        const n = d.shape.reduce((a, b) => a * b, 1);
        const x = (d.dtype === "uint8" ? new Uint8Array(n) : new Float32Array(n)).map((_, i) => i % 255);
        const times = [];
        for (let k = 0; k < runs + 3; k++) {
            const t = performance.now();
            const input = new lrt.Tensor(x, Array.from(d.shape));
            for (const out of await model.run(input)) (await out.moveTo("wasm")).delete();
            input.delete();
            if (k >= 3) times.push(performance.now() - t);
        }
        model.delete();
        return times.sort((a, b) => a - b)[Math.floor(runs / 2)];
    }""", [url, runs])


# The released network cut after each stage (a level's two convolutions; in the decoder also the
# transposed convolution and the concatenation): the time each adds, in the page and natively.
STAGES = (["enc0_relu2", "enc1_relu2", "enc2_relu2", "enc3_relu2", "bottleneck_relu2"]
          + [f"dec{i}_{part}" for i in (3, 2, 1, 0) for part in ("up", "concat", "relu2")]
          + ["mask"])


def stage_models(folder):
    """Each cut of models/skin_unet.keras as an int8 .tflite, converted as export.py converts
    (calibrated on random images: the scales differ from the released file's, the work does not)."""
    import keras

    import export

    model = keras.models.load_model(os.path.join(ROOT, "models", "skin_unet.keras"), compile=False)
    size = model.input_shape[1]
    images = [np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
              for i in range(8)]
    for name in STAGES:
        saved = os.path.join(folder, name + "_saved")
        export.write_saved_model(keras.Model(model.inputs, model.get_layer(name).output), size,
                                 saved, batch=1)
        with open(os.path.join(folder, name + ".tflite"), "wb") as f:
            f.write(export.convert(saved, "int8", images))


def stage_figures(browser, runs):
    folder = tempfile.mkdtemp()
    stage_models(folder)
    server, origin, _ = serve({"/x/s/": folder})
    page = browser.new_context(service_workers="block").new_page()  # one thread
    page.goto(origin + "/web/")
    page.wait_for_selector("body[data-ready]", state="attached")
    rows = [(name, tflite_in_page(page, f"/x/s/{name}.tflite", runs),
             python_litert(runs, 1, os.path.join(folder, name + ".tflite"))) for name in STAGES]
    server.shutdown()
    return rows


ORT_PAGE = """<!doctype html><meta charset="utf-8"><script type="module">
import * as ort from "/x/ort/node_modules/onnxruntime-web/dist/ort.wasm.bundle.min.mjs";
window.bench = async (file, threads, runs) => {
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.wasmPaths = location.origin + "/x/ort/node_modules/onnxruntime-web/dist/";
  const session = await ort.InferenceSession.create(file, {executionProviders: ["wasm"]});
  const x = new Float32Array(128 * 128 * 3).map((_, i) => i % 255);
  const times = [];
  for (let k = 0; k < runs + 3; k++) {
    const t = performance.now();
    await session.run({image: new ort.Tensor("float32", x, [1, 128, 128, 3])});
    if (k >= 3) times.push(performance.now() - t);
  }
  return times.sort((a, b) => a - b)[Math.floor(runs / 2)];
};
window.ready = true;
</script>"""


def ort_figures(browser, ort_dir, onnx_dir, runs):
    harness = tempfile.mkdtemp()
    with open(os.path.join(harness, "ort.html"), "w") as f:
        f.write(ORT_PAGE)
    rows = []
    for isolate, threads in ((False, 1), (True, 2)):
        server, origin, _ = serve({"/x/ort/": ort_dir, "/x/onnx/": onnx_dir, "/x/h/": harness},
                                  isolate)
        page = browser.new_page()
        page.goto(origin + "/x/h/ort.html")
        page.wait_for_function("window.ready === true")
        for name in ("model_int8.onnx", "model.onnx"):
            ms = page.evaluate("([f, t, n]) => bench(f, t, n)", ["/x/onnx/" + name, threads, runs])
            rows.append((f"onnxruntime-web {name}", threads, ms))
        page.close()
        server.shutdown()
    return rows


def predict_py(photos):
    """predict.py's masks and rows for the photos: {name: (mask, row)}."""
    import csv

    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as out:
        for path in photos:
            os.symlink(os.path.abspath(path), os.path.join(folder, os.path.basename(path)))
        subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), "--weights", INT8,
                        "--data", folder, "--out", out], check=True, capture_output=True, cwd=ROOT)
        with open(os.path.join(out, "predictions.csv")) as f:
            rows = {row["image_id"]: row for row in csv.DictReader(f)}
        return {name: (imaging.load_mask(os.path.join(out, f"{name}_segmentation.png")), row)
                for name, row in rows.items()}


def agreement(seen, python):
    dices, flags, gaps = [], 0, []
    for photo in seen:
        name = os.path.splitext(photo["name"])[0]
        truth, row = python[name]
        size = int(round(len(photo["output"]) ** 0.5))
        prob = np.array(photo["output"], np.float32).reshape(size, size) / 256
        mask = imaging.resize_prob(prob, (photo["height"], photo["width"])) > np.float32(0.5)
        both = np.count_nonzero(mask) + np.count_nonzero(truth)
        dices.append(2 * np.count_nonzero(mask & truth) / both if both else 1.0)
        flags += bool(photo["review"]) == bool(int(row["review"]))
        gaps.append(abs(photo["uncertainty"] - float(row["uncertainty"])))
    return dices, flags, gaps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "isic2018"))
    p.add_argument("--photos", type=int, default=50)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--float", dest="float32", help="a float32 .tflite to time in LiteRT.js too")
    p.add_argument("--ort", help="a folder with node_modules/onnxruntime-web")
    p.add_argument("--onnx", help="the folder of model.onnx and model_int8.onnx (export.py's)")
    p.add_argument("--stages", action="store_true",
                   help="also the time each stage of the network adds, page and Python (TensorFlow)")
    p.add_argument("--screenshot", help="also a JPEG of the page on a phone-sized screen, the first photo")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(ROOT, "web", "node_modules")):
        sys.exit("bench_web.py: web/node_modules missing: run `npm ci --prefix web` first")
    photos = sorted(f for f in glob.glob(os.path.join(args.data, "**", "*.jpg"), recursive=True)
                    if "superpixels" not in f)[:args.photos]
    if not photos:
        sys.exit(f"{args.data}: no .jpg photos found")
    from playwright.sync_api import sync_playwright

    float_dir = os.path.dirname(os.path.abspath(args.float32)) if args.float32 else None
    server, origin, sent = serve({"/x/f/": float_dir} if float_dir else None)
    float_ms = None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context()  # a first visit: sw.js, one reload, the threaded build
        page = context.new_page()
        isolated = page_visit(page, origin + "/web/", photos, args.runs)
        assert page.evaluate("window.skinUnet.offline") is True
        first_bytes = dict(sent)
        context.close()
        context = browser.new_context(service_workers="block")  # no isolation: one thread
        single = page_visit(context.new_page(), origin + "/web/", photos, args.runs)
        context.close()
        if args.float32:
            page = browser.new_context(service_workers="block").new_page()  # one thread
            page.goto(origin + "/web/")
            page.wait_for_selector("body[data-ready]", state="attached")
            float_ms = tflite_in_page(page, "/x/f/" + os.path.basename(args.float32), args.runs)
            page.close()
        ort = ort_figures(browser, args.ort, args.onnx, args.runs) if args.ort else []
        stages = stage_figures(browser, args.runs) if args.stages else []
        if args.screenshot:
            phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                        is_mobile=True, has_touch=True)
            page_visit(phone.new_page(), origin + "/web/", photos[:1], 3)
            phone.pages[0].screenshot(path=args.screenshot, full_page=True, type="jpeg", quality=80)
            phone.close()
        version = browser.version
        browser.close()
    server.shutdown()

    print(cpu_line())
    print(f"Chromium {version} headless, {os.cpu_count()} cores; LiteRT.js 2.5.3 (web/package-lock.json)")
    print(f"{'runtime':<38} {'threads':>7} {'ms per model call':>18} {'ms per photo (median, max)':>27}")
    for label, visit in (("page, no service worker", single), ("page, isolated by sw.js", isolated)):
        totals = [ph["ms"]["total"] for ph in visit["photos"]]
        print(f"{label:<38} {visit['threads']:>7} {visit['call_ms']:>18.1f} "
              f"{statistics.median(totals):>18.0f}, {max(totals):.0f}")
    if float_ms is not None:
        print(f"{'page LiteRT.js, a float32 .tflite':<38} {1:>7} {float_ms:>18.1f}")
    for label, threads, ms in ort:
        print(f"{label:<38} {threads:>7} {ms:>18.1f}")
    for threads in (1, 2):
        print(f"{'Python LiteRT (ai_edge_litert)':<38} {threads:>7} {python_litert(args.runs, threads):>18.1f}")

    if stages:
        print("--stages: the int8 network cut after each stage, one thread, ms (what the stage adds)")
        print(f"{'cut after':<18} {'page':>15} {'Python LiteRT':>15}")
        last = (0.0, 0.0)
        for name, web, native in stages:
            print(f"{name:<18} {web:6.2f} ({web - last[0]:+5.2f}) {native:6.2f} ({native - last[1]:+5.2f})")
            last = (web, native)
    total = sum(first_bytes.values())
    zipped = sum(len(gzip.compress(open(f, "rb").read(), 6)) for f in first_bytes)
    print(f"first visit: {len(first_bytes)} files, {total / 1e6:.1f} MB sent ({zipped / 1e6:.1f} MB "
          "gzipped, what a host that compresses sends); the biggest:")
    for path, size in sorted(first_bytes.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {size / 1e6:6.2f} MB  {os.path.relpath(path, ROOT)}")

    python = predict_py(photos)
    dices, flags, gaps = agreement(isolated["photos"], python)
    sides = [max(ph["width"], ph["height"]) for ph in isolated["photos"]]
    print(f"agreement with predict.py on {len(dices)} photos of {args.data} ({min(sides)}-{max(sides)} px): "
          f"Dice min {min(dices):.4f}, median {statistics.median(dices):.4f}; "
          f"{sum(d >= 0.98 for d in dices)} of {len(dices)} at >= 0.98; review flag the same on "
          f"{flags} of {len(dices)}; |uncertainty difference| median {statistics.median(gaps):.4f}, "
          f"max {max(gaps):.4f}")


if __name__ == "__main__":
    main()
