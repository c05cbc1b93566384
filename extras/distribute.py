"""Training over several devices or processes: train.py --distribute, or its "auto" on a machine
with more than one GPU (or a run over several processes, extras/cluster.py). train.setup names this
module only when the mode it resolved is not "none"; one device never imports it.

    mirrored        TensorFlow's MirroredStrategy over this host's GPUs (or CPUs)
    data_parallel   Keras's DataParallel distribution on JAX, over every device of every process
"""
import dataclasses
import sys

import common


def setup(mode, backend, batch):
    """(strategy scope, replicas) for `mode`, with the global distribution set where the backend
    keeps one; one line (exit 2) for a backend that cannot, or a batch that does not split."""
    import contextlib

    import keras
    if mode == "mirrored":
        if backend != "tensorflow":
            raise common.Error("--distribute mirrored",
                               f"needs KERAS_BACKEND=tensorflow (this is {backend})")
        import tensorflow as tf  # TF backend only
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.MirroredStrategy(
            [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))])
        scope, replicas = strategy.scope, strategy.num_replicas_in_sync
    else:
        if backend != "jax":
            raise common.Error("--distribute data_parallel",
                               f"needs KERAS_BACKEND=jax (this is {backend})")
        devices = keras.distribution.list_devices()
        distribution = keras.distribution.DataParallel(devices=devices)
        distribution.auto_shard_dataset = False  # each process's Batches hold only its part
        keras.distribution.set_distribution(distribution)
        scope, replicas = contextlib.nullcontext, len(devices)
    if batch % replicas:
        if mode == "data_parallel":
            keras.distribution.set_distribution(None)
        raise common.Error(f"--batch {batch}", f"must be a multiple of the {replicas} replicas")
    return scope, replicas


def split_evenly(arrays, replicas):
    """The validation set (data.Arrays) cut to a multiple of `replicas` images (at most
    replicas - 1 dropped): data-parallel validation needs every batch to split evenly over the
    replicas (tf.distribute fails on uneven shards). Each source's rows are clamped to match."""
    n = len(arrays.images)
    keep = n // replicas * replicas
    if keep == 0:
        raise common.Error("--val-fraction", f"{n} validation images cannot be split "
                           f"over {replicas} replicas; raise it")
    if keep < n:
        print(f"note: validating on {keep} of {n} images (a multiple of {replicas} "
              "replicas)", file=sys.stderr)
    sources = [{**s, "start": min(s["start"], keep), "stop": min(s["stop"], keep)}
               for s in arrays.sources]
    return dataclasses.replace(arrays, pairs=arrays.pairs[:keep], images=arrays.images[:keep],
                               masks=arrays.masks[:keep], sources=sources)
