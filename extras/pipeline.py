"""The model never waits for the disk: predict.py's photos and evaluate.py's images go through
overlap(), which decodes the next batch and finishes (scores, writes) the previous one in threads
while the model predicts: the default path of both, kept out of their straight read. Pillow's
decoding and PNG writes release the GIL, so the threads run beside the model's batch
(`python bench/bench_evaluate.py --photos` measures a whole run against the model's own time).
"""
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def overlap(items, decode, finish, predict, batch, timing, problems, bar, workers=None):
    """While the model predicts batch i, one thread decodes batch i + 1 and a pool finishes
    (scores, writes) batch i - 1: at most three batches in flight. decode(item) -> (a tuple ending
    in the model input, or a problem dict; seconds); finish(decoded, prob) runs in the pool.
    Yields (decoded, finish's result) in item order; problems and times are recorded."""
    chunks = (items[i:i + batch] for i in range(0, len(items), batch))
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(1) as decoder, ThreadPoolExecutor(workers) as pool:
        submit = lambda chunk: [decoder.submit(decode, item) for item in chunk or ()]
        decoding, finishing = submit(next(chunks, None)), []
        while decoding:
            decoded = []
            for job in decoding:
                result, seconds = job.result()
                timing["decode"] += seconds
                if isinstance(result, dict):
                    problems.append(result)
                    bar.update()
                else:
                    decoded.append(result)
            decoding = submit(next(chunks, None))
            if decoded:
                t = time.perf_counter()
                probs = predict(np.stack([d[-1] for d in decoded]))
                timing["predict"] += time.perf_counter() - t
                jobs = [(d, pool.submit(finish, d, prob)) for d, prob in zip(decoded, probs)]
                for d, job in finishing:  # batch i - 1 has been finishing while batch i predicted
                    yield d, job.result()
                finishing = jobs
        for d, job in finishing:
            yield d, job.result()
