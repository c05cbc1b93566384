"""The compiled train step alone, the way fit runs it: asynchronous steps on batches already on the
device, for each form of the U-Net (unet.py's up / down), without metrics, and on the torch backend.

    python bench/bench_step.py                                   # CPU protocol shape: 128 px, base 12, batch 16
    python bench/bench_step.py --size 256 --filters 32 --batch 64 --variants stock,both,torch
    KERAS_BACKEND=jax python bench/bench_step.py --profile 5     # also the top device ops of 5 steps

Each variant runs fit on one batch held on the device, handed over by a PyDataset `--steps` times
per epoch: no host feed, no per-step sync (train_on_batch syncs and copies the logs every step, so it
understates an asynchronous step). images/s is the median of the epochs after the first; compile_s is
the first epoch's excess over that. Precision is train.py's choice for this machine; XLA too
(`--jit auto`; where train.py would time both, on a TensorFlow CPU, Keras's default: off), or
`--jit on|off`, or `--jit both` for each variant with and without. The CPU model and its flags are
printed first: a figure without its machine says little.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import common  # noqa: E402
import train  # noqa: E402

# name: (upsample, pool, metrics)
VARIANTS = {"stock": ("transpose", "max", True), "matmul": ("matmul", "max", True),
            "reshape": ("transpose", "reshape", True), "both": ("matmul", "reshape", True),
            "no_metrics": ("transpose", "max", False)}


def build(variant, size, depth, filters, batch, jit=None):
    """(model compiled as train.py compiles it, device-resident x, y, settings) for one variant;
    jit None: train.py's choice for this machine."""
    import keras

    import unet

    upsample, pool, metrics = VARIANTS[variant]
    keras.backend.clear_session()
    cfg = train.config_of(["--size", str(size), "--depth", str(depth), "--filters", str(filters),
                           "--batch", str(batch)])
    _, rt = train.setup(cfg)
    info = dataclasses.asdict(rt)
    info["precision"] = info["precision"] or "float32"  # where train.py would probe: its default
    keras.mixed_precision.set_global_policy(info["precision"])
    info["jit"] = info["jit"] if jit is None else jit
    if info["jit"] is None:  # where train.py would probe a long run: Keras's default here (--jit both times both)
        info["jit"] = False
    model = unet.compile_model(unet.build_unet(size, filters, depth, upsample=upsample, pool=pool),
                               jit_compile=info["jit"])
    if not metrics:
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=unet.bce_dice, jit_compile=info["jit"])
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    y = keras.ops.convert_to_tensor((rng.random((batch, size, size, 1)) > 0.5).astype(np.uint8))
    return model, x, y, info


def one_batch(keras, x, y, steps):
    class Same(keras.utils.PyDataset):
        def __len__(self):
            return steps

        def __getitem__(self, index):
            return x, y

    return Same()


def step_rate(variant, size=128, depth=4, filters=12, batch=16, steps=20, epochs=3, jit=None, profile=0):
    """{"images_per_s", "compile_s", "epochs_s", "settings"} of one variant's train step under fit;
    profile > 0 (JAX): also "top_ops" of that many more steps of the same compiled step."""
    import keras

    model, x, y, info = build(variant, size, depth, filters, batch, jit)
    times = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):  # fit has synced the epoch's logs by now
            times.append(time.perf_counter() - self.t)

    try:
        model.fit(one_batch(keras, x, y, steps), epochs=epochs, verbose=0, callbacks=[Clock()])
        steady = statistics.median(times[1:])
        result = {"images_per_s": round(steps * batch / steady, 1), "compile_s": round(times[0] - steady, 1),
                  "epochs_s": [round(t, 2) for t in times], "settings": info}
        if profile:
            try:
                result["top_ops"] = top_ops(model, x, y, profile)
            except Exception as e:  # a profiler that fails must not cost the timing
                result["top_ops"] = {"skipped": common.one_line(e)}
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return result


def torch_rate(size, depth, filters, batch, steps, epochs):
    """The stock variant on KERAS_BACKEND=torch with jit_compile=True (torch.compile), in a child
    process; {"skipped": why} without torch."""
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        return {"skipped": "torch is not installed"}
    code = (f"import json, sys; sys.path.insert(0, {os.path.join(ROOT, 'bench')!r}); import bench_step\n"
            f"print(json.dumps(bench_step.step_rate('stock', {size}, {depth}, {filters}, {batch}, {steps}, {epochs}, "
            f"jit=True)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "KERAS_BACKEND": "torch"})
    if r.returncode:
        return {"skipped": f"failed: {common.one_line(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode)}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def top_ops(model, x, y, steps, top=12):
    """JAX only: the device ops that took the most time over `steps` more train steps of a model fit
    has already compiled, from jax.profiler's trace: [{"op", "ms" (per step), "share"}]. On a GPU
    these are the kernels; on a CPU, XLA's host-side op events."""
    import jax
    import keras

    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            model.fit(one_batch(keras, x, y, steps), epochs=1, verbose=0)
        paths = [os.path.join(d, f) for d, _, fs in os.walk(logdir) for f in fs if f.endswith(".xplane.pb")]
        profile = jax.profiler.ProfileData.from_file(paths[0])
    totals, device_planes = {}, [p for p in profile.planes if p.name.startswith("/device:")]
    for plane in device_planes or [p for p in profile.planes if p.name.startswith("/host:")]:
        for line in plane.lines:
            # GPU: the "XLA Ops" line holds one event per kernel; the CPU has no device plane, so
            # take the host threads' events that name HLO ops (XLA's CPU runtime emits those).
            if device_planes and line.name not in ("XLA Ops",):
                continue
            for event in line.events:
                name = event.name
                if not device_planes and not any(k in name for k in ("fusion", "convolution", "dot", "reduce",
                                                                     "select", "scatter", "gather", "copy")):
                    continue
                totals[name] = totals.get(name, 0.0) + event.duration_ns / 1e6
    total = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [{"op": name, "ms": round(ms / steps, 3), "share": round(ms / total, 3)} for name, ms in ranked]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--filters", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="the first compiles; the median of the rest counts")
    ap.add_argument("--variants", default="stock,matmul,reshape,both,no_metrics",
                    help=f"comma-separated, of {', '.join(VARIANTS)}, torch")
    ap.add_argument("--jit", choices=["auto", "on", "off", "both"], default="auto")
    ap.add_argument("--repeat", type=int, default=1, help="run the list this many times (noisy machines)")
    ap.add_argument("--profile", type=int, default=0, help="JAX: also the top ops of this many steps")
    ap.add_argument("--json", default=None, help="also write every figure here")
    args = ap.parse_args()
    keras = common.import_keras()
    from machine import cpu_line

    print(f"{cpu_line()}; {keras.backend.backend()} {train.accelerator()}, Keras {keras.__version__}; "
          f"{args.size} px, base {args.filters}, depth {args.depth}, batch {args.batch}, {args.steps} steps x "
          f"{args.epochs} epochs", flush=True)
    shape = (args.size, args.depth, args.filters, args.batch, args.steps, args.epochs)
    jits = {"auto": [None], "on": [True], "off": [False], "both": [True, False]}[args.jit]
    results = {}
    for _ in range(args.repeat):
        for variant in args.variants.split(","):
            for jit in [None] if variant == "torch" else jits:
                name = variant + ("" if args.jit != "both" else "/xla" if jit else "/no_xla")
                r = torch_rate(*shape) if variant == "torch" else step_rate(variant, *shape, jit=jit)
                results.setdefault(name, []).append(r)
                if "skipped" in r:
                    print(f"  {name:17s} skipped: {r['skipped']}", flush=True)
                else:
                    s = r["settings"]
                    print(f"  {name:17s} {r['images_per_s']:8.1f} images/s  compile {r['compile_s']:5.1f} s  "
                          f"({s['backend']} {s['precision']} jit={s['jit']})", flush=True)
    best = {k: max(r.get("images_per_s", 0) for r in v) for k, v in results.items()}
    first = next(iter(best.values()), 0)
    if first:
        print(f"best of repeats, relative to {next(iter(best))}: " + ", ".join(f"{k} {v / first:.3f}" for k, v in best.items()))
    if args.profile:
        ops = step_rate("stock", *shape, profile=args.profile)["top_ops"]
        results["top_ops"] = ops
        for op in ops:
            print(f"  {op['ms']:9.3f} ms/step  {op['share']:6.1%}  {op['op']}")
    if args.json:
        common.atomic_write(args.json, lambda f: f.write(json.dumps({"cpu": train.cpu_info(), **results}, indent=1).encode()))


if __name__ == "__main__":
    main()
