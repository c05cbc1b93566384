"""LiteRT latency timing: export.py's report.json carries it for each --threads count, and
bench/bench_export.py times its candidates with it (ONNX Runtime's twin: extras/onnx_format.py).
"""
import time

import numpy as np


def tflite_ms(path, threads, runs=20, warmup=3):
    """Median wall time of one invoke of a .tflite file with LiteRT's default XNNPACK delegate."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=path, num_threads=threads)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    x = np.random.default_rng(0).integers(0, 256, inp["shape"]).astype(inp["dtype"])
    times = []
    for i in range(warmup + runs):
        interp.set_tensor(inp["index"], x)
        t = time.perf_counter()
        interp.invoke()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return round(1000 * float(np.median(times)), 2)
