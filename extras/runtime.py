"""The machine a training run lands on, resolved once into a frozen Runtime: Keras backend,
accelerator, precision, XLA (jit), distribution over devices, where augmentation runs, and the CPU.

train.py imports it at the start of every run (not at `import train`); --precision, --jit,
--distribute and --augment-on choose here, and run.json records the result (Runtime.record).
feed() hands data.Batches to model.fit through Keras' worker threads.
XLA on a TensorFlow CPU is decided by timing both settings (probe_jit): docs/training.md says why.
"""
import contextlib
import dataclasses
import os
import platform
import sys
import time

import common

XLA_PROBE_MIN_STEPS = 500  # a shorter run would spend too much of itself on the probe
XLA_PROBE_STEPS, XLA_PROBE_ROUNDS, XLA_PROBE_MARGIN = 3, 2, 1.05


@dataclasses.dataclass(frozen=True)
class Runtime:
    backend: str  # "jax", "tensorflow" or "torch"
    accelerator: str  # "gpu", "tpu" or "cpu"
    cpu: dict  # cpu_info()
    precision: str  # the Keras dtype policy
    jit: bool  # XLA; None until settle_jit where only a probe can tell
    jit_reason: str
    distribute: str  # "none", "mirrored" or "data_parallel"
    replicas: int  # devices the global batch is split over
    processes: int  # processes (hosts) of the run; 1 on one host
    process: int  # this one's index
    augment_on: str  # "host", "device", or None without augmentation
    jit_probe: dict = None  # the probe's images/s, when it ran

    def record(self):
        """The settings as run.json holds them (jit_probe only when the probe ran)."""
        fields = dataclasses.asdict(self)
        if fields["jit_probe"] is None:
            del fields["jit_probe"]
        return fields


def accelerator():
    """'gpu' / 'tpu' when the active backend sees one, else 'cpu' (never imports another
    backend)."""
    import keras
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        return jax.default_backend() if jax.default_backend() in ("gpu", "tpu") else "cpu"
    if backend == "tensorflow":
        import tensorflow as tf  # TF backend only
        return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    if backend == "torch":
        import torch
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu"


def cpu_info():
    """The host CPU as run.json and every benchmark record it: {"model", "flags" (of avx2, avx512f,
    avx512_bf16, amx_tile), "cores"}. Whether XLA helps a CPU step depends on it."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
    return {"model": model, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count()}


def jit_rule(cfg, accel, mode):
    """(XLA on?, why) for this backend and machine; (None, why) where only a timed probe can
    tell."""
    import keras
    if cfg.jit != "auto":
        return cfg.jit == "on", f"--jit {cfg.jit}"
    backend = keras.backend.backend()
    if backend == "jax":
        return True, "JAX runs op by op without it"
    if backend != "tensorflow":
        return False, f"{backend}: Keras's default"
    if mode == "mirrored":
        return False, "XLA cannot reach MirroredStrategy's per-device variables"
    if accel != "cpu":
        return True, "on an accelerator XLA fuses batch norm and ReLU into the convolutions"
    return None, "TensorFlow on a CPU: XLA helps on some CPUs and hurts on others"


def distribution_mode(cfg, backend, accel, cluster):
    """--distribute auto: data_parallel for JAX with several devices (or processes), mirrored for
    TensorFlow with several GPUs, else none."""
    if cfg.distribute != "auto":
        return cfg.distribute
    if backend == "jax":
        import keras
        devices = [d for d in keras.distribution.list_devices() if not d.lower().startswith("cpu")]
        return "data_parallel" if len(devices) > 1 or cluster else "none"
    if backend == "tensorflow" and accel == "gpu":
        import tensorflow as tf  # TF backend only
        return "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "none"
    return "none"


def setup(cfg, cluster=None):
    """Set precision and distribution for this machine: (strategy scope, Runtime). The scope is
    MirroredStrategy's, else a null context. Runtime.jit is None where settle_jit must probe.
    cluster (extras/cluster.py): every device of every process takes part."""
    import keras
    accel = accelerator()
    backend = keras.backend.backend()
    precision = cfg.precision
    if precision == "auto":
        precision = "mixed_bfloat16" if accel != "cpu" else "float32"
    keras.mixed_precision.set_global_policy(precision)
    mode = distribution_mode(cfg, backend, accel, cluster)
    scope, replicas = contextlib.nullcontext, 1
    if mode == "mirrored":
        if backend != "tensorflow":
            raise common.Error("--distribute mirrored",
                               f"needs KERAS_BACKEND=tensorflow (this is {backend})")
        import tensorflow as tf  # TF backend only
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.MirroredStrategy(
            [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))])
        scope, replicas = strategy.scope, strategy.num_replicas_in_sync
    elif mode == "data_parallel":
        if backend != "jax":
            raise common.Error("--distribute data_parallel",
                               f"needs KERAS_BACKEND=jax (this is {backend})")
        devices = keras.distribution.list_devices()
        distribution = keras.distribution.DataParallel(devices=devices)
        distribution.auto_shard_dataset = False  # each process's Batches hold only its part
        keras.distribution.set_distribution(distribution)
        replicas = len(devices)
    if cfg.batch % replicas:
        if mode == "data_parallel":
            keras.distribution.set_distribution(None)
        raise common.Error(f"--batch {cfg.batch}", f"must be a multiple of the {replicas} replicas")
    # Pillow threads feed a CPU-bound step easily but cap a GPU (docs/training.md): there keras.ops.
    augment_on = cfg.augment_on
    if augment_on == "auto":
        augment_on = "host" if accel == "cpu" else "device"
    jit, why = jit_rule(cfg, accel, mode)
    return scope, Runtime(
        backend=backend, accelerator=accel, cpu=cpu_info(), precision=precision, jit=jit,
        jit_reason=why, distribute=mode, replicas=replicas,
        processes=cluster.processes if cluster else 1, process=cluster.index if cluster else 0,
        augment_on=augment_on if cfg.augment else None)


def reset(runtime):
    """Undo setup's global settings (a second run in the same process starts clean)."""
    import keras
    if runtime.distribute == "data_parallel":
        keras.distribution.set_distribution(None)
    keras.mixed_precision.set_global_policy("float32")


def settle_jit(runtime, cfg, planned_steps, batch, build):
    """Where jit_rule leaves XLA to a probe: probe a run long enough to pay for it, else off.
    batch: one (x, y) training batch; build(): a new uncompiled model. Returns the new Runtime."""
    if runtime.jit is not None:
        return runtime
    if planned_steps < XLA_PROBE_MIN_STEPS:
        why = f"Keras's CPU default (a run of {planned_steps} steps is too short to probe)"
        return dataclasses.replace(runtime, jit=False, jit_reason=why)
    jit, why, rates = probe_jit(cfg, build, *batch)
    import keras
    keras.utils.set_random_seed(cfg.seed)  # the real model starts where it would have without it
    return dataclasses.replace(runtime, jit=jit, jit_reason=why, jit_probe=rates)


def probe_jit(cfg, build, x, y):
    """Time XLA against TensorFlow's own kernels on this machine: a throwaway model per setting,
    one warm-up step (which compiles), then XLA_PROBE_STEPS steps, in XLA_PROBE_ROUNDS interleaved
    rounds, best of each. XLA only where it wins by XLA_PROBE_MARGIN. (jit, why, rates)."""
    import unet

    models = {}
    for jit in (True, False):
        models[jit] = unet.compile_model(build(), cfg.loss, cfg.lr, jit)
        models[jit].train_on_batch(x, y)
    rates = {True: 0.0, False: 0.0}
    for _ in range(XLA_PROBE_ROUNDS):
        for jit, model in models.items():
            t = time.perf_counter()
            for _ in range(XLA_PROBE_STEPS):
                model.train_on_batch(x, y)  # synchronous: returns host numbers
            rates[jit] = max(rates[jit], XLA_PROBE_STEPS * len(x) / (time.perf_counter() - t))
    del models
    jit = rates[True] > XLA_PROBE_MARGIN * rates[False]
    why = f"probe on this CPU: XLA {rates[True]:.1f} vs {rates[False]:.1f} images/s without"
    return jit, why, {"xla": round(rates[True], 2), "no_xla": round(rates[False], 2)}


def split_evenly(images, masks, replicas):
    """Data-parallel validation needs every batch to split evenly over the replicas (tf.distribute
    fails on uneven shards): keep a multiple of `replicas` images (at most replicas - 1 dropped)."""
    keep = len(images) // replicas * replicas
    if keep == 0:
        raise common.Error("--val-fraction", f"{len(images)} validation images cannot be split "
                           f"over {replicas} replicas; raise it")
    if keep < len(images):
        print(f"note: validating on {keep} of {len(images)} images (a multiple of {replicas} "
              "replicas)", file=sys.stderr)
    return images[:keep], masks[:keep]


def device_batches(runtime, batches):
    """With --augment-on device, batch i drawn on the host and warped on the accelerator
    (extras/device_augment.py), for feed(); else None."""
    if runtime.augment_on != "device":
        return None
    from extras import device_augment
    return device_augment.device_batches(batches)


def feed(batches, workers, get=None):
    """data.Batches as a keras.utils.PyDataset: fit's worker threads call batches[i] in parallel
    (augmentation is Pillow C code that releases the GIL, and threads share the arrays for free).
    get(i): batch i another way (extras/device_augment.py: warped on the accelerator)."""
    import keras
    get = get or batches.__getitem__

    class Feed(keras.utils.PyDataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, index):
            return get(index)

        def on_epoch_end(self):
            batches.on_epoch_end()

    return Feed(workers=workers, max_queue_size=16)
