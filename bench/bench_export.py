"""int8 TFLite size and LiteRT latency of the default model and mobile candidates vs the targets.

    python bench/bench_export.py [--runs 20] [--threads 1,2] [--presets default,f32,f12_128,f16_128,f8_128,f16,f8,mnv3s]
    python bench/bench_export.py --onnx --presets default,f12_128   # + float32 .tflite and model.onnx

Size and latency do not depend on the trained weights, so each preset is built with random weights
(unet.build_unet, or extras/encoders.py's build_encoder_unet for mnv3s) and calibrated on 8
synthetic images; the accuracy side of the targets (int8 within 0.5 Dice points of float, mobile
within 1.5 of default) needs trained models: export.py's report.json.
Targets: default (base 12, 256 px; f32 = the paper-sized base 32) <= 8 MB and <= 15 ms; mobile <= 2 MB
and <= 5 ms, 2 threads.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import cpu_line  # noqa: E402  (the CPU every benchmark names)

import export  # noqa: E402
import unet  # noqa: E402
from extras import synthetic  # noqa: E402

# name: (build_unet kwargs, size MB target, ms target)
PRESETS = {
    "default": (dict(size=256), 8.0, 15.0),  # build_unet's defaults: base 12
    "f32": (dict(size=256, filters=32), 8.0, 15.0),
    "f12_128": (dict(size=128), 2.0, 5.0),
    "f16": (dict(size=256, filters=16), 2.0, 5.0),
    "f16_128": (dict(size=128, filters=16), 2.0, 5.0),
    "f8": (dict(size=256, filters=8), 2.0, 5.0),
    "f8_128": (dict(size=128, filters=8), 2.0, 5.0),
    "mnv3s": (dict(size=256, filters=16, encoder="mobilenetv3small"), 2.0, 5.0),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--presets", default="default,f32,f12_128,f8_128")
    parser.add_argument("--onnx", action="store_true",
                        help="also the float32 .tflite (LiteRT) and model.onnx (ONNX Runtime), batch 1")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    print(cpu_line())
    print(f"{'preset':<10}{'params':>10}{'int8 MB':>9}{'target':>8}" +
          "".join(f"{f'ms@{t}thr':>10}" for t in threads) + f"{'target':>8}  verdict")
    for name in args.presets.split(","):
        kwargs, mb_target, ms_target = PRESETS[name]
        model = build(kwargs)
        size = kwargs["size"]
        images, _ = synthetic.make_synthetic(8, seed=0, size_wh=(size, size))
        work = tempfile.mkdtemp(prefix="bench_export-")
        try:
            t = time.perf_counter()
            export.write_saved_model(model, size, os.path.join(work, "sm"), batch=1)
            path = os.path.join(work, "int8.tflite")
            with open(path, "wb") as f:
                f.write(export.convert(os.path.join(work, "sm"), "int8", images))
            convert_s = time.perf_counter() - t
            mb = os.path.getsize(path) / 1e6
            ms = [export.tflite_ms(path, n, args.runs) for n in threads]
            if args.onnx:
                others = float32_and_onnx(model, size, work, threads, args.runs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ok = mb <= mb_target and ms[-1] <= ms_target
        print(f"{name:<10}{model.count_params():>10,}{mb:>9.2f}{mb_target:>8.1f}" +
              "".join(f"{m:>10.1f}" for m in ms) + f"{ms_target:>8.1f}  "
              f"{'meets' if ok else 'misses'} (convert {convert_s:.0f}s)", flush=True)
        for label, (mb, ms) in (others.items() if args.onnx else ()):
            print(f"{'  ' + label:<20}{mb:>9.2f}{'':>8}" + "".join(f"{m:>10.1f}" for m in ms),
                  flush=True)


def build(kwargs):
    """A preset's model, random weights: with an encoder, extras/encoders.py's backbone U-Net
    (unet.build_unet no longer takes encoder=), else unet.build_unet."""
    if "encoder" in kwargs:
        from extras import encoders  # keras.applications: only a preset with an encoder needs it
        return encoders.build_encoder_unet(**kwargs)
    return unet.build_unet(**kwargs)


def float32_and_onnx(model, size, work, threads, runs):
    """{label: (MB, [ms per thread count])} of the float32 .tflite and model.onnx, batch 1."""
    path = os.path.join(work, "float32.tflite")
    with open(path, "wb") as f:
        f.write(export.convert(os.path.join(work, "sm"), "float32"))
    onnx_path = os.path.join(work, "model.onnx")
    export.write_onnx(model, onnx_path)
    return {"float32 .tflite": (os.path.getsize(path) / 1e6,
                                [export.tflite_ms(path, n, runs) for n in threads]),
            "float32 .onnx": (os.path.getsize(onnx_path) / 1e6,
                              [export.onnx_ms(onnx_path, size, n, runs) for n in threads])}


if __name__ == "__main__":
    main()
