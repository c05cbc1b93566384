"""Training speed per precision on this CPU, in images/s and GFLOP/s, against the CPU's peak.

    python bench/cpu_peak.py [--size 128 --batch 16 --filters 12 --steps 12]

For float32 and, where the CPU has bfloat16 arithmetic, mixed_bfloat16: train.py's U-Net compiled as
train.py compiles it (XLA off, as its probe chose on this CPU), one warm-up step, then 3 rounds of
`--steps` train_on_batch steps on one batch, best round kept. FLOP per training image: the
convolutions' multiply-adds counted from the built model (2 x k x k x Cin x Cout per output pixel;
a transposed convolution per input pixel), times 3 for a training step (the forward pass, and the
backward pass's two products: gradients for the inputs and for the weights); batch norm, ReLU and
the loss are left out (under 2%).

Peak = cores x FMA pipes x float32 lanes per pipe x 2 (an FMA is two FLOP) x clock, the clock from
/proc/cpuinfo's "cpu MHz" (what the hypervisor reports; turbo can run above it). Zen 4 has two
256-bit FMA pipes (AVX-512 runs as two halves), so 2 x 8 lanes; a bfloat16 dot product
(VDPBF16PS) does two multiply-adds per float32 lane, so bfloat16's peak is twice float32's.
`--pipes` and `--lanes` set them for another CPU. Also printed: a float32 matrix product through
NumPy's BLAS, what a tuned kernel reaches on these cores.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from machine import cpu_line  # noqa: E402

import train  # noqa: E402


def conv_flops(model):
    """FLOP of one image's forward pass through every convolution (nested models included)."""
    import keras

    total = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Conv2DTranspose):
            k = np.prod(layer.kernel_size)
            cin, cout = layer.input.shape[-1], layer.filters
            total += 2 * k * cin * cout * np.prod(layer.input.shape[1:3])
        elif isinstance(layer, keras.layers.Conv2D):
            k = np.prod(layer.kernel_size)
            cin, cout = layer.input.shape[-1], layer.filters
            total += 2 * k * cin * cout * np.prod(layer.output.shape[1:3])
    return int(total)


def clock_ghz():
    with open("/proc/cpuinfo") as f:
        mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
    return max(mhz) / 1000


def blas_gflops(n=2048, repeats=5):
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def images_per_sec(precision, args):
    import keras

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(precision)
    cfg = train.config_of(["--size", str(args.size), "--batch", str(args.batch),
                           "--filters", str(args.filters)])
    model = train.compiled_model(cfg, jit=False)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    y = (rng.random((args.batch, args.size, args.size, 1)) > 0.5).astype(np.uint8)
    model.train_on_batch(x, y)
    best = min(_timed(lambda: [model.train_on_batch(x, y) for _ in range(args.steps)])
               for _ in range(3))
    keras.mixed_precision.set_global_policy("float32")
    return args.steps * args.batch / best, model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--filters", type=int, default=12)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--pipes", type=int, default=2)
    p.add_argument("--lanes", type=int, default=8, help="float32 lanes per FMA pipe")
    args = p.parse_args(argv)
    cpu = train.cpu_info()
    cores, ghz = cpu["cores"], clock_ghz()
    peak32 = cores * args.pipes * args.lanes * 2 * ghz
    precisions = ["float32"]
    if train.precision_rule(train.config_of([]), "cpu", cpu["flags"])[0] is None:
        precisions.append("mixed_bfloat16")
    print(cpu_line())
    print(f"peak float32 = {cores} cores x {args.pipes} FMA pipes x {args.lanes} lanes x 2 x "
          f"{ghz:.2f} GHz = {peak32:.0f} GFLOP/s; bfloat16 dot products: {2 * peak32:.0f}; "
          f"NumPy float32 matrix product: {blas_gflops():.0f} GFLOP/s")
    print("| precision | images/s | GFLOP per image | GFLOP/s | of its peak |")
    print("|---|---:|---:|---:|---:|")
    for precision in precisions:
        rate, model = images_per_sec(precision, args)
        flop = 3 * conv_flops(model)
        peak = peak32 * (2 if "bfloat16" in precision else 1)
        gflops = rate * flop / 1e9
        print(f"| {precision} | {rate:.1f} | {flop / 1e9:.2f} | {gflops:.0f} | "
              f"{100 * gflops / peak:.0f}% of {peak:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
