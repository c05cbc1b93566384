"""The side of bench/arm_check.py that runs on the (emulated) ARM CPU: invoke .tflite files on given
images with LiteRT and save their raw outputs.

    python arm_guest.py JOB.npz OUT.npz

JOB.npz holds `images` (uint8 (N, S, S, 3)) and `job`, a JSON string {"models": [paths], "threads":
[counts]}; OUT.npz gets one raw output array per model and thread count ("<k>/<threads>") and `info`,
a JSON string describing the CPU that ran it. Only NumPy and ai_edge_litert are imported: the arm64
Python of bench/arm_setup.sh has nothing else. arm_check.py also imports this file to compute the
x86 reference, so both sides run the same lines.
"""
import json
import platform
import sys
import time

import numpy as np


def model_input(detail, images):
    """uint8 RGB images as the model's input tensor: export.py's int8 file takes the bytes unchanged
    (scale 1, zero point 0), its float files take float32 0..255; other quantized inputs are scaled."""
    if not np.issubdtype(detail["dtype"], np.integer):
        return images.astype(detail["dtype"])
    scale, zero = detail["quantization"]
    if (scale, zero) in ((1.0, 0), (0.0, 0)):
        return images.astype(detail["dtype"])
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(images / np.float32(scale) + zero), info.min, info.max).astype(detail["dtype"])


def run(paths, images, threads):
    """{"<k>/<t>": raw outputs (N, ...) of model k at t threads}, {"<k>/<t>": seconds of the invokes}.

    LiteRT's default CPU path (the XNNPACK delegate) is what phones run; it picks its kernels for the
    CPU it finds at start-up, which is the point of running this on several CPUs."""
    from ai_edge_litert.interpreter import Interpreter

    outputs, seconds = {}, {}
    for k, path in enumerate(paths):
        for t in threads:
            interp = Interpreter(model_path=path, num_threads=t)
            interp.allocate_tensors()
            inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
            x = model_input(inp, images)
            ys = []
            start = time.perf_counter()
            for image in x:
                interp.set_tensor(inp["index"], image[None])
                interp.invoke()
                ys.append(interp.get_tensor(out["index"])[0].copy())
            seconds[f"{k}/{t}"] = time.perf_counter() - start
            outputs[f"{k}/{t}"] = np.stack(ys)
    return outputs, seconds


def cpu_info():
    """The machine and, on ARM, what /proc/cpuinfo advertises (what XNNPACK's CPU probe reads)."""
    info = {"machine": platform.machine(), "features": [], "part": None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "Features" and not info["features"]:
                    info["features"] = value.split()
                elif key.strip() == "CPU part" and info["part"] is None:
                    info["part"] = value.strip()
    except OSError:
        pass
    return info


def main(job_path, out_path):
    job = np.load(job_path)
    spec = json.loads(str(job["job"]))
    outputs, seconds = run(spec["models"], job["images"], spec["threads"])
    info = {**cpu_info(), "seconds": seconds}
    np.savez(out_path, info=json.dumps(info), **outputs)


if __name__ == "__main__":
    main(*sys.argv[1:3])
