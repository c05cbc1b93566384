"""The GPU check, driven by bench/gpu.sh: train.py against the PyTorch peer, where the time goes
(host feed or model step), and the accuracy of full 256-px runs, all into one JSON file.

    python bench/gpu_bench.py prepare-data SRC DST --size 256   # resized copy, same ISIC layout
    python bench/gpu_bench.py smoke-data DIR                    # tiny synthetic stand-ins (CPU smoke)
    python bench/gpu_bench.py peer --out peer.json              # the PyTorch peer (own process)
    python bench/gpu_bench.py run --data D --fullres F --out OUT [--peer peer.json] [--tiny]

`run` answers the most important question first and rewrites OUT/gpu.json after every stage, so a
run cut short still says what it found. The stages: (1, gpu.sh) the peer; (2) train.py end to end
and its ratio to the peer; (3) the step alone in each form (bench/bench_step.py); (4) the feed alone,
host side and device augmentation; (5) the top device ops of a few steps; (6) a base-32 model trained
to early stopping with the fastest form, on what is left of the budget, scored on val, test and the
full-resolution set. It also writes OUT/runs.tar.gz (each run's log.csv and run.json, each
evaluation's summary.json and metrics.csv) and the converged best.keras (weights only) in parts of
at most 15 MiB: `cat best.keras.part* > best.keras`. Keep KERAS_BACKEND=jax: the GPU machine has no
TensorFlow.
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

import common  # noqa: E402
import data  # noqa: E402
import imaging  # noqa: E402
import layouts  # noqa: E402
import train  # noqa: E402
from extras import synthetic  # noqa: E402

# Plain, visible settings. GPU: the real check, planned for 8 minutes on one H200 (stages past their
# share are cut short, and the last one, the converged model, gets what is left). TINY: the same
# stages at toy sizes, so `gpu.sh smoke` runs every line on a CPU in well under 3 minutes.
GPU = {"size": 256, "depth": 4, "filters": 32, "batch": 64, "speed_epochs": 4, "step_steps": 30,
       "peer_steps": 60, "profile_steps": 5, "budget_s": 480, "eval_reserve_s": 75, "converged_min_s": 150,
       "max_epochs": 150, "train_flags": []}
TINY = {"size": 32, "depth": 2, "filters": 4, "batch": 8, "speed_epochs": 2, "step_steps": 3,
        "peer_steps": 3, "profile_steps": 2, "budget_s": 150, "eval_reserve_s": 20, "converged_min_s": 10,
        "max_epochs": 2, "train_flags": ["--batch", "8", "--depth", "2"],
        # XLA:CPU at optimization level 0 (the smoke's, for speed) turns reduce_max's gradient, so
        # --pool reshape's, into NaN; at the default level, and on GPUs, it matches MaxPooling2D's.
        "converged_variant": "stock"}
# Step variants in the order they matter (a stage cut short keeps the first ones): bench/bench_step.py.
STEP_VARIANTS = ("stock", "both", "matmul", "reshape", "no_metrics", "torch")
PART_BYTES = 15 * 2**20  # files come back from the GPU machine up to 16 MiB each: the base-32 model is ~31 MB


def log(msg):
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -----------------------------------------------------------------------------------------------
# Data for the GPU machine (../shared stays behind; only the working tree travels)

def prepare_data(src, dst, size):
    """Copy an ISIC-layout folder with every image and mask squash-resized to size x size (JPEG q85,
    PNG 0/255) through imaging.py's own loaders and resizers, so the copy reads as the original does."""
    pairs, problems, layout = layouts.find_pairs(src)
    for problem in problems:
        log(f"skipped: {problem['file']}: {problem['problem']}")

    def one(pair):
        image = imaging.resize_image(imaging.read_image(pair.image, min_size=(size, size))[0], (size, size))
        mask = imaging.resize_mask(imaging.load_mask(pair.mask), (size, size))
        for path, array, fmt in ((pair.image, image, "JPEG"), (pair.mask, mask.astype(np.uint8) * 255, "PNG")):
            out = os.path.join(dst, os.path.relpath(path, src))
            if fmt == "JPEG":
                out = os.path.splitext(out)[0] + ".jpg"
            common.atomic_write(out, lambda f: Image.fromarray(array).save(f, fmt, quality=85),
                              durable=False)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one, pairs))
    log(f"{dst}: {len(pairs)} pairs ({layout} layout) at {size}x{size}")


def smoke_data(folder):
    """Stand-ins for the real sets: 48 synthetic pairs in the ISIC 2018 layout, resized the way
    prepare-data does, and 3 larger pairs in the ISIC 2017 layout as the 'full-resolution' set."""
    raw = os.path.join(folder, "raw")
    layouts.write_synthetic(raw, 48, seed=1, size_wh=(96, 72))
    prepare_data(raw, os.path.join(folder, "isic2018"), 64)
    fullres = os.path.join(folder, "isic2017-fullres")
    images, masks = synthetic.make_synthetic(3, seed=2, size_wh=(200, 150))
    _, img_dir, mask_dir = layouts.LAYOUTS["isic2017"][1]
    for i, (image, mask) in enumerate(zip(images, masks)):
        common.atomic_write(os.path.join(fullres, img_dir, f"ISIC_{i:07d}.jpg"),
                          lambda f: Image.fromarray(image).save(f, "JPEG", quality=92))
        common.atomic_write(os.path.join(fullres, mask_dir, f"ISIC_{i:07d}_segmentation.png"),
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
    common.atomic_write(out, lambda f: f.write(json.dumps(result, indent=1).encode()))


# -----------------------------------------------------------------------------------------------
# The stages

def train_py_rate(data_dir, p, epochs, out):
    """train.py as a user runs it (real JPEGs, augmentation where train.py puts it, callbacks): the
    median images/s of its log.csv from the 2nd epoch on (the 1st compiles), and every epoch's figure."""
    cmd = ["--data", data_dir, "--size", str(p["size"]), "--depth", str(p["depth"]), "--filters", str(p["filters"]),
           "--batch", str(p["batch"]), "--epochs", str(epochs), "--patience", "0", "--out", out, "--fresh",
           "--verbose", "0"]
    rc = train.main(cmd)
    if rc:
        raise SystemExit(f"train.py {' '.join(cmd)} failed (exit {rc})")
    with open(os.path.join(out, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(out, "run.json")) as f:
        run = json.load(f)
    rates = [float(r["images_per_sec"]) for r in rows]
    return {"images_per_s": float(np.median(rates[1:] or rates)), "epochs": rates,
            "epoch_seconds": [float(r["seconds"]) for r in rows], "augment_on": run.get("augment_on"),
            "precision": run.get("precision"), "jit": run.get("jit")}


def feed_rates(images, masks, batch, seconds=3.0):
    """The feed in its two halves: the host side of the GPU feed (Batches.draw: gather, draws, uint8
    hand-over; one thread, then one per core) and the device augmentation alone (the compiled
    keras.ops warp on batches already on the device)."""
    import keras
    from bench_data import host_feed_rate

    from extras import device_augment

    def host(threads):
        return round(host_feed_rate(images, masks, batch, seconds, threads), 1)

    result = {"host_1_thread": host(1), f"host_{os.cpu_count()}_threads": host(os.cpu_count())}
    batches = data.Batches(images, masks, batch, drop_remainder=True, seed=0)
    n = len(batches)
    warp = device_augment.device_warp(batches)
    on_device = [[keras.ops.convert_to_tensor(a) for a in batches.draw(i)] for i in range(min(n, 8))]
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        for drawn in on_device:
            out = warp(*drawn)
        keras.ops.convert_to_numpy(out[1][:1])  # waits for the device
        done += len(on_device) * batch
    result["device_augment"] = round(done / (time.perf_counter() - t), 1)
    return result


def accuracy(data_dir, fullres, p, variant, epochs, cap_s, out):
    """Train base `filters` at `size` with the fastest step variant until early stopping (or the time
    cap: train.py resumes after a kill and best.keras is complete at every moment), then score val,
    test and the full-resolution set with evaluate.py, exactly as a user runs them."""
    import bench_step

    import evaluate
    upsample, pool, _ = bench_step.VARIANTS[variant]
    run_dir = os.path.join(out, "converged")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", data_dir, "--size", str(p["size"]),
           "--filters", str(p["filters"]), "--upsample", upsample, "--pool", pool, "--epochs", str(epochs),
           "--out", run_dir, "--fresh", "--verbose", "0", *p["train_flags"]]
    log(" ".join(cmd[1:]))
    t = time.time()
    try:
        rc = subprocess.run(cmd, timeout=max(cap_s, 1)).returncode
    except subprocess.TimeoutExpired:
        rc = "time cap"
    result = {"variant": variant, "epochs_planned": epochs, "train_seconds": round(time.time() - t, 1),
              "train_exit": rc}
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    rows = []
    if os.path.exists(os.path.join(run_dir, "log.csv")):
        with open(os.path.join(run_dir, "log.csv")) as f:
            rows = list(csv.DictReader(f))
    result.update(params=run["params"], epochs_done=len(rows), result=run.get("result"),
                  images_per_sec=float(np.median([float(r["images_per_sec"]) for r in rows[1:]] or [0])))
    best = os.path.join(run_dir, "best.keras")
    if not os.path.exists(best):  # diverged in its first epoch, or cut before one ended: nothing to score
        return result
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
    t_all = float(os.environ.get("GPU_BENCH_T0", time.time()))  # gpu.sh's start: the peer counts too
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_step
    import keras
    from machine import cpu_line

    report = {"command": " ".join(sys.argv), "tiny": args.tiny, "backend": keras.backend.backend(),
              "accelerator": train.accelerator(), "cpu": cpu_line(), "settings": p, "seconds": {}}
    if keras.backend.backend() == "jax":
        import jax
        report["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
        report["versions"] = {"jax": jax.__version__, "keras": keras.__version__}
    report["peer"] = json.load(open(args.peer)) if args.peer and os.path.isfile(args.peer) else {"skipped": "no peer.json"}
    peer_rate = report["peer"].get(str(p["batch"]), {}).get("images_per_s")
    shape = (p["size"], p["depth"], p["filters"], p["batch"])
    left = lambda: p["budget_s"] - (time.time() - t_all)  # noqa: E731

    def stage(name):
        report["seconds"][name] = round(time.time() - stage.t, 1)
        stage.t = time.time()
        common.atomic_write(os.path.join(args.out, "gpu.json"),
                          lambda f: f.write(json.dumps(report, indent=1).encode()), durable=False)
    stage.t = time.time()

    # 2. The headline: train.py end to end, as a user runs it, against the peer.
    report["train_py"] = train_py_rate(args.data, p, p["speed_epochs"], os.path.join(work, "speed"))
    rate = report["train_py"]["images_per_s"]
    report["ratio_to_peer"] = round(rate / peer_rate, 3) if peer_rate else None
    log(f"train.py: {rate:.1f} images/s (epochs {report['train_py']['epochs']}, augment on the "
        f"{report['train_py']['augment_on']}); peer {peer_rate}; ratio {report['ratio_to_peer']}")
    stage("train_py")

    # 3. The step alone, each variant, while the budget keeps enough for the converged model; the
    # stock step also gives (5) the top device ops of a few more steps, with no second compile.
    report["step"] = {}
    for variant in STEP_VARIANTS:
        if left() < p["eval_reserve_s"] + p["converged_min_s"]:
            report["step"][variant] = {"skipped": f"{left():.0f} s of the budget left"}
            continue
        try:
            r = (bench_step.torch_rate(*shape, p["step_steps"], 3) if variant == "torch" else
                 bench_step.step_rate(variant, *shape, p["step_steps"], 3,
                                      profile=p["profile_steps"] if variant == "stock" else 0))
        except Exception as e:  # one form that fails must not cost the others
            r = {"skipped": f"failed: {common.one_line(e)}"}
        report["top_ops"] = r.pop("top_ops", report.get("top_ops"))
        report["step"][variant] = r
        log(f"step alone, {variant}: {r.get('images_per_s', r.get('skipped'))} images/s, compile {r.get('compile_s')} s")
        stage(f"step_{variant}")

    # 4. The feed alone: the host side and the device augmentation, separately.
    train_set = data.load_split(args.data, "train", p["size"], progress=False)
    report["feed"] = feed_rates(train_set.images, train_set.masks, p["batch"], seconds=3.0 if not args.tiny else 0.5)
    log(f"feed alone: {report['feed']} images/s")
    del train_set
    stage("feed")

    # 6. The converged model, with the fastest form of the step, on what is left of the budget.
    timed = {v: r["images_per_s"] for v, r in report["step"].items() if v in ("stock", "both", "matmul", "reshape")
             and "images_per_s" in r}
    variant = p.get("converged_variant") or (max(timed, key=timed.get) if timed else "stock")
    epoch_s = max(report["train_py"]["epoch_seconds"][1:] or report["train_py"]["epoch_seconds"])
    # train.py's default batch, 16, runs an epoch in up to ~2.5x the speed run's batch-64 time (smaller
    # kernels, 4x the steps), and the first epoch compiles: plan the cosine schedule to end in time.
    cap = left() - p["eval_reserve_s"]
    epochs = int(max(2, min(p["max_epochs"], (cap - 40) / (2.5 * epoch_s))))
    report["accuracy"] = accuracy(args.data, args.fullres, p, variant, epochs, cap, work)
    stage("accuracy")
    report["seconds"]["total"] = round(time.time() - t_all, 1)
    pack(report, work, args.out)
    print(table(report), flush=True)


def pack(report, work, out):
    """At most 8 files come back from the GPU machine, each up to 16 MiB: gpu.json, one tarball, and
    the converged best.keras (weights only) in parts: `cat best.keras.part* > best.keras` joins them."""
    with common.atomic_path(os.path.join(out, "runs.tar.gz")) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for folder, _, files in os.walk(work):
            if "cache" in os.path.relpath(folder, work).split(os.sep):
                continue
            for name in files:
                if name in ("log.csv", "run.json", "summary.json", "metrics.csv"):
                    path = os.path.join(folder, name)
                    tar.add(path, os.path.relpath(path, work))
    import keras
    best = os.path.join(work, "converged", "best.keras")
    if os.path.exists(best):  # weights only: the optimizer state would triple the file
        whole = os.path.join(work, "best.keras")
        keras.models.load_model(best, compile=False).save(whole)
        with open(whole, "rb") as f:
            for i, chunk in enumerate(iter(lambda: f.read(PART_BYTES), b"")):
                common.atomic_write(os.path.join(out, f"best.keras.part{i}"), lambda g: g.write(chunk))
    common.atomic_write(os.path.join(out, "gpu.json"), lambda f: f.write(json.dumps(report, indent=1).encode()))


def table(report):
    """The README's GPU rows, from gpu.json."""
    s = report["settings"]
    peer = report["peer"].get(str(s["batch"]), {}).get("images_per_s", "n/a")
    lines = [f"devices {report.get('devices')}, backend {report['backend']}, host {report.get('cpu')}",
             f"{s['size']} px, base {s['filters']}, batch {s['batch']}",
             "", "| what | images/s | vs peer |", "|---|---|---|",
             f"| train.py end to end (augment on the {report['train_py']['augment_on']}) | "
             f"{report['train_py']['images_per_s']:.1f} | **{report['ratio_to_peer']}** |",
             f"| PyTorch peer (bf16, torch.compile, data on the device) | {peer} | 1.0 |"]
    for variant, r in report["step"].items():
        if "images_per_s" in r:
            ratio = f"{r['images_per_s'] / peer:.3f}" if isinstance(peer, (int, float)) else "n/a"
            lines.append(f"| step alone, {variant} (compile {r['compile_s']} s) | {r['images_per_s']} | {ratio} |")
        else:
            lines.append(f"| step alone, {variant} | {r['skipped']} | |")
    for key, value in report["feed"].items():
        lines.append(f"| feed alone, {key.replace('_', ' ')} | {value} | |")
    if isinstance(report.get("top_ops"), list):
        lines += ["", "| top device op | ms/step | share |", "|---|---|---|"]
        lines += [f"| `{op['op']}` | {op['ms']} | {op['share']:.1%} |" for op in report["top_ops"][:8]]
    acc = report["accuracy"]
    if "val" not in acc:
        return "\n".join(lines + ["", f"converged: no model ({acc['variant']}, exit {acc['train_exit']})"])
    lines += ["", f"converged: {acc['variant']}, {acc['epochs_done']} of {acc['epochs_planned']} epochs, "
              f"{acc['train_seconds']} s, {acc['params'] / 1e6:.2f} M params",
              "| split | images | Dice | thresholded Jaccard |", "|---|---|---|---|"]
    for split in ("val", "test", "isic2017_fullres"):
        lines.append(f"| {split} | {acc[split]['images']} | {acc[split]['dice']:.3f} | "
                     f"{acc[split]['threshold_jaccard']:.3f} |")
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
        peer(args.out, (p["batch"],), p["size"], p["peer_steps"], args.script)
    elif args.cmd == "run":
        run(args)
    else:
        print(table(json.load(open(args.json))))


if __name__ == "__main__":
    main()
