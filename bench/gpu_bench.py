"""The GPU check, driven by bench/gpu.sh: train.py against the PyTorch peer, where the time goes
(host feed or model step), and the accuracy of full 256-px runs, all into one JSON file.

    python bench/gpu_bench.py prepare-data SRC DST --size 256   # resized copy, same ISIC layout
    python bench/gpu_bench.py smoke-data DIR                    # tiny synthetic stand-ins (CPU smoke)
    python bench/gpu_bench.py peer --out peer.json              # the PyTorch peer (own process)
    python bench/gpu_bench.py run --data D --fullres F --out OUT [--peer peer.json] [--tiny]

`run` writes OUT/gpu.json (every figure), OUT/runs.tar.gz (each run's log.csv and run.json, each
evaluation's summary.json and metrics.csv) and OUT/best_filters12.keras (the default model,
weights only). Keep KERAS_BACKEND=jax: the GPU machine has no TensorFlow.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402

# Plain, visible settings. GPU: the real check (<= 8 minutes on one H100). TINY: the same steps
# at toy sizes, so `gpu.sh smoke` exercises every line on a CPU in well under 3 minutes.
# The first GPU run (2026-11-27) took 10 minutes with batches (64, 128) and caps 120/150 s; batch 128
# told nothing batch 64 did not, so one batch size and equal caps keep it inside 8.
GPU = {"size": 256, "depth": 4, "speed_filters": 32, "batches": (64,), "speed_epochs": 4,
       "step_iters": 30, "peer_steps": 60, "models": (12, 32), "train_flags": [],
       "train_cap_s": {12: 120, 32: 120}}
TINY = {"size": 32, "depth": 2, "speed_filters": 4, "batches": (8,), "speed_epochs": 2, "step_iters": 3,
        "peer_steps": 3, "models": (12, 4), "train_flags": ["--epochs", "2", "--batch", "8", "--depth", "2"],
        "train_cap_s": {12: 120, 4: 120}}


def log(msg):
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -----------------------------------------------------------------------------------------------
# Data for the GPU machine (../shared stays behind; only the working tree travels)

def prepare_data(src, dst, size):
    """Copy an ISIC-layout folder with every image and mask squash-resized to size x size (JPEG q85,
    PNG 0/255) through data.py's own loaders and resizers, so the copy reads as the original does."""
    pairs, problems, layout = data.find_pairs(src)
    for problem in problems:
        log(f"skipped: {problem['file']}: {problem['problem']}")

    def one(pair):
        image = data.resize_image(data.load_image(pair.image, min_size=(size, size)), (size, size))
        mask = data.resize_mask(data.load_mask(pair.mask), (size, size))
        for path, array, fmt in ((pair.image, image, "JPEG"), (pair.mask, mask.astype(np.uint8) * 255, "PNG")):
            out = os.path.join(dst, os.path.relpath(path, src))
            if fmt == "JPEG":
                out = os.path.splitext(out)[0] + ".jpg"
            data.atomic_write(out, lambda f: Image.fromarray(array).save(f, fmt, quality=85),
                              durable=False)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one, pairs))
    log(f"{dst}: {len(pairs)} pairs ({layout} layout) at {size}x{size}")


def smoke_data(folder):
    """Stand-ins for the real sets: 48 synthetic pairs in the ISIC 2018 layout, resized the way
    prepare-data does, and 3 larger pairs in the ISIC 2017 layout as the 'full-resolution' set."""
    raw = os.path.join(folder, "raw")
    data.write_synthetic(raw, 48, seed=1, size_wh=(96, 72))
    prepare_data(raw, os.path.join(folder, "isic2018"), 64)
    fullres = os.path.join(folder, "isic2017-fullres")
    images, masks = data.make_synthetic(3, seed=2, size_wh=(200, 150))
    _, img_dir, mask_dir = data.LAYOUTS["isic2017"][1]
    for i, (image, mask) in enumerate(zip(images, masks)):
        data.atomic_write(os.path.join(fullres, img_dir, f"ISIC_{i:07d}.jpg"),
                          lambda f: Image.fromarray(image).save(f, "JPEG", quality=92))
        data.atomic_write(os.path.join(fullres, mask_dir, f"ISIC_{i:07d}_segmentation.png"),
                          lambda f: Image.fromarray(mask.astype(np.uint8) * 255).save(f, "PNG"))


# -----------------------------------------------------------------------------------------------
# The PyTorch peer (separate process: torch and JAX each want the GPU's memory)

def peer(out, batches, size, steps, script):
    """Time ../shared/bench/torch_unet_peer.py (its own run_torch) at each batch; {"skipped"} without
    torch or without the script."""
    import importlib.util
    result = {"script": script}
    if importlib.util.find_spec("torch") is None:
        result["skipped"] = "torch is not installed"
    elif not os.path.isfile(script):
        result["skipped"] = f"{script}: not found (run bench/gpu.sh prepare)"
    if "skipped" not in result:
        spec = importlib.util.spec_from_file_location("torch_unet_peer", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for batch in batches:
            r = module.run_torch(size, batch, True, steps)
            result[str(batch)] = {"images_per_s": round(r["images"] / r["seconds"], 1), **r}
            log(f"peer batch {batch}: {result[str(batch)]['images_per_s']} images/s ({r['note']})")
    else:
        log(f"peer skipped: {result['skipped']}")
    data.atomic_write(out, lambda f: f.write(json.dumps(result, indent=1).encode()))


# -----------------------------------------------------------------------------------------------
# Speed: the feed alone, the step alone, then train.py's real loop

def feed_rate(images, masks, batch, passes=2):
    """Images/s of data.Batches with augmentation and no model, on every core (as fit's workers)."""
    batches = data.Batches(images, masks, batch, augment=True, shuffle=True, seed=0)
    n, rate = len(batches), 0.0
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for _ in range(passes):  # the first pass warms the pool and the page cache
            t = time.perf_counter()
            for _ in pool.map(batches.__getitem__, range(n)):
                pass
            rate = n * batch / (time.perf_counter() - t)
    return rate


def step_rate(size, depth, filters, batch, iters):
    """Images/s of the compiled train step alone, on a batch already on the device: the model's
    ceiling inside Keras, with the precision and XLA settings train.py picks for this machine."""
    import keras
    import train
    import unet

    keras.backend.clear_session()
    cfg = train.config_of({"size": size, "depth": depth, "filters": filters, "batch": batch})
    _, info = train.setup_backend(keras, unet, cfg)
    try:
        model = unet.compile_model(unet.build_unet(size, filters, depth), jit_compile=info["jit"])
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        y = (rng.random((batch, size, size, 1)) > 0.5).astype(np.uint8)
        if keras.backend.backend() == "jax":
            import jax
            x, y = jax.device_put(x), jax.device_put(y)
        for _ in range(3):  # compile + warm-up
            model.train_on_batch(x, y)
        t = time.perf_counter()
        for _ in range(iters):  # train_on_batch returns host numbers: each step is synced
            model.train_on_batch(x, y)
        return iters * batch / (time.perf_counter() - t), info
    finally:
        keras.mixed_precision.set_global_policy("float32")


def train_py_rate(data_dir, size, depth, filters, batch, epochs, out):
    """train.py's own figure: the median images/s of log.csv from the 2nd epoch on (the 1st compiles)."""
    import train
    train.train({"data": data_dir, "size": size, "depth": depth, "filters": filters, "batch": batch, "epochs": epochs,
                 "patience": 0, "out": out, "fresh": True, "verbose": 0})
    with open(os.path.join(out, "log.csv")) as f:
        rates = [float(r["images_per_sec"]) for r in csv.DictReader(f)]
    return float(np.median(rates[1:] or rates)), rates


# -----------------------------------------------------------------------------------------------
# Accuracy: train.py and evaluate.py exactly as a user runs them

def accuracy(data_dir, fullres, size, filters, flags, cap_s, out):
    """Train until early stopping (or the time cap: train.py resumes after a kill, and best.keras
    is complete at every moment), then score val, test and the full-resolution set."""
    import evaluate
    run_dir = os.path.join(out, f"filters{filters}")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", data_dir, "--size", str(size),
           "--filters", str(filters), "--out", run_dir, "--fresh", "--verbose", "0", *flags]
    log(" ".join(cmd[1:]))
    t = time.time()
    try:
        rc = subprocess.run(cmd, timeout=cap_s).returncode
    except subprocess.TimeoutExpired:
        rc = "time cap"
    result = {"train_seconds": round(time.time() - t, 1), "train_exit": rc}
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    with open(os.path.join(run_dir, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    result.update(params=run["params"], epochs_done=len(rows), result=run.get("result"),
                  images_per_sec=float(np.median([float(r["images_per_sec"]) for r in rows[1:]] or [0])))
    best = os.path.join(run_dir, "best.keras")
    for name, extra in (("val", ["--split", "val"]), ("test", ["--split", "test"]),
                        ("isic2017_fullres", ["--data", fullres, "--split", "all"])):
        eval_dir = os.path.join(run_dir, f"eval_{name}")
        rc = evaluate.main(["--weights", best, "--out", eval_dir, "--no-progress", *extra])
        if rc:
            raise SystemExit(f"evaluate.py failed on {name} (exit {rc})")
        with open(os.path.join(eval_dir, "summary.json")) as f:
            s = json.load(f)
        result[name] = {k: s[k] for k in ("images", "dice", "jaccard", "threshold_jaccard",
                                          "sensitivity", "specificity", "accuracy")}
        result[name]["median_dice"] = s["median"]["dice"]
    return result


def run(args):
    p = TINY if args.tiny else GPU
    os.makedirs(args.out, exist_ok=True)
    work = args.work
    os.environ.setdefault("SKIN_UNET_CACHE", os.path.join(work, "cache"))
    t_all = time.time()
    import keras
    import unet
    report = {"command": " ".join(sys.argv), "tiny": args.tiny, "backend": keras.backend.backend(),
              "accelerator": unet.accelerator(), "cores": os.cpu_count(), "settings": {
                  k: v for k, v in p.items() if k != "train_cap_s"}, "seconds": {}}
    if keras.backend.backend() == "jax":
        import jax
        report["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
        report["versions"] = {"jax": jax.__version__, "keras": keras.__version__}
    report["peer"] = json.load(open(args.peer)) if args.peer and os.path.isfile(args.peer) else {"skipped": "no peer.json"}
    size, f_speed = p["size"], p["speed_filters"]

    def stage(name):
        report["seconds"][name] = round(time.time() - stage.t, 1)
        stage.t = time.time()
        data.atomic_write(os.path.join(args.out, "gpu.json"),
                          lambda f: f.write(json.dumps(report, indent=1).encode()), durable=False)
    stage.t = time.time()

    train_set = data.load_split(args.data, "train", size, progress=False)
    stage("load")
    report["feed"] = {str(b): round(feed_rate(train_set.images, train_set.masks, b), 1) for b in p["batches"]}
    log(f"feed alone (augment, {os.cpu_count()} threads): {report['feed']} images/s")
    stage("feed")
    report["step"] = {}
    for b in p["batches"]:
        rate, info = step_rate(size, p["depth"], f_speed, b, p["step_iters"])
        report["step"][str(b)], report["step_settings"] = round(rate, 1), info
        log(f"model step alone, batch {b}: {rate:.1f} images/s ({info})")
    stage("step")
    report["train_py"], report["ratio_to_peer"], report["train_py_epochs"] = {}, {}, {}
    for b in p["batches"]:
        rate, rates = train_py_rate(args.data, size, p["depth"], f_speed, b, p["speed_epochs"],
                                    os.path.join(work, f"speed_b{b}"))
        report["train_py"][str(b)], report["train_py_epochs"][str(b)] = round(rate, 1), rates
        peer_rate = report["peer"].get(str(b), {}).get("images_per_s")
        report["ratio_to_peer"][str(b)] = round(rate / peer_rate, 3) if peer_rate else None
        log(f"train.py batch {b}: {rate:.1f} images/s (epochs {rates}); peer {peer_rate}")
    stage("speed")
    del train_set
    report["accuracy"] = {}
    for filters in p["models"]:
        report["accuracy"][f"filters{filters}"] = accuracy(args.data, args.fullres, size, filters, p["train_flags"],
                                                           p["train_cap_s"][filters], work)
        stage(f"accuracy_filters{filters}")
    report["seconds"]["total"] = round(time.time() - t_all, 1)
    pack(report, work, args.out, p["models"][0])
    print(table(report), flush=True)


def pack(report, work, out, default_filters):
    """At most 8 files come back from the GPU machine: gpu.json, one tarball, the default model."""
    with data.atomic_path(os.path.join(out, "runs.tar.gz")) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for folder, _, files in os.walk(work):
            if "cache" in os.path.relpath(folder, work).split(os.sep):
                continue
            for name in files:
                if name in ("log.csv", "run.json", "summary.json", "metrics.csv"):
                    path = os.path.join(folder, name)
                    tar.add(path, os.path.relpath(path, work))
    import keras
    best = os.path.join(work, f"filters{default_filters}", "best.keras")
    if os.path.exists(best):  # weights only: the optimizer state would triple the file
        keras.models.load_model(best, compile=False).save(os.path.join(out, f"best_filters{default_filters}.keras"))
    data.atomic_write(os.path.join(out, "gpu.json"), lambda f: f.write(json.dumps(report, indent=1).encode()))


def table(report):
    """The README's GPU rows, from gpu.json."""
    lines = [f"devices {report.get('devices')}, backend {report['backend']}, {report['cores']} cores",
             "| batch | train.py img/s | peer img/s | ratio | feed alone img/s | step alone img/s |",
             "|---|---|---|---|---|---|"]
    for b in report["train_py"]:
        peer_rate = report["peer"].get(b, {}).get("images_per_s", "n/a")
        lines.append(f"| {b} | {report['train_py'][b]} | {peer_rate} | {report['ratio_to_peer'][b]} "
                     f"| {report['feed'][b]} | {report['step'][b]} |")
    lines += ["", "| model | params | epochs | split | images | Dice | thresholded Jaccard |", "|---|---|---|---|---|---|---|"]
    for name, acc in report["accuracy"].items():
        for split in ("val", "test", "isic2017_fullres"):
            s = acc[split]
            lines.append(f"| {name} | {acc['params'] / 1e6:.2f} M | {acc['epochs_done']} | {split} | {s['images']} "
                         f"| {s['dice']:.3f} | {s['threshold_jaccard']:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare-data")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--size", type=int, default=256)
    a = sub.add_parser("smoke-data")
    a.add_argument("dir")
    a = sub.add_parser("peer")
    a.add_argument("--out", required=True)
    a.add_argument("--tiny", action="store_true")
    a.add_argument("--script", default=os.path.join(ROOT, ".gpu", "peer", "torch_unet_peer.py"))
    a = sub.add_parser("run")
    a.add_argument("--data", required=True)
    a.add_argument("--fullres", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--work", required=True, help="scratch folder: runs, evaluations, the array cache")
    a.add_argument("--peer", default=None, help="peer.json from the peer step")
    a.add_argument("--tiny", action="store_true")
    a = sub.add_parser("table")
    a.add_argument("json")
    args = ap.parse_args()
    if args.cmd == "prepare-data":
        prepare_data(args.src, args.dst, args.size)
    elif args.cmd == "smoke-data":
        smoke_data(args.dir)
    elif args.cmd == "peer":
        p = TINY if args.tiny else GPU
        peer(args.out, p["batches"], p["size"], p["peer_steps"], args.script)
    elif args.cmd == "run":
        run(args)
    else:
        print(table(json.load(open(args.json))))


if __name__ == "__main__":
    main()
