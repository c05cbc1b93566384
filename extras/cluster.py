"""A training run over several processes (hosts), through JAX's distributed runtime.

The environment brings it in, not a flag: KERAS_DISTRIBUTION_* (keras.distribution.initialize's
variables) or SLURM's. train.main then runs the same command in a child process that joins the
others (supervise), so that a peer that dies or never comes is one line and exit 1, not a C++
stack trace; --cluster-timeout says how long to wait. Process 0 writes the run; docs/training.md.
"""
import os
import subprocess
import sys
import tempfile
from typing import NamedTuple

import common

WORKER_ENV = "SKIN_UNET_CLUSTER_WORKER"  # set in the child process that joins the cluster
# What a collective says when a peer is gone (gloo on the CPU, the coordination service).
PEER_LOST = ("Gloo", "Connection closed by peer", "coordination service", "DEADLINE_EXCEEDED",
             "UNAVAILABLE")


class Cluster(NamedTuple):
    coordinator: str  # host:port of process 0; None where JAX finds it itself (SLURM)
    processes: int
    index: int


def cluster_of(env=os.environ):
    """This process's place in a run over several processes, or None for one. The variables are
    keras.distribution.initialize's (KERAS_DISTRIBUTION_JOB_ADDRESSES: process 0's host:port first,
    KERAS_DISTRIBUTION_NUM_PROCESSES, KERAS_DISTRIBUTION_PROCESS_ID), else SLURM's (SLURM_NTASKS,
    SLURM_PROCID; JAX then reads the coordinator from SLURM's node list itself)."""
    keras_vars = "KERAS_DISTRIBUTION_NUM_PROCESSES" in env
    if keras_vars:
        names = ("KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID")
    else:
        names = ("SLURM_NTASKS", "SLURM_PROCID")
    try:
        processes, index = int(env.get(names[0], "1")), int(env.get(names[1], "0"))
    except ValueError:
        raise common.Error(names[0], f"{env.get(names[0])!r} / {env.get(names[1])!r}: "
                           "not whole numbers") from None
    if processes < 2:
        return None
    if not 0 <= index < processes:
        raise common.Error(names[1], f"{index} is not a process of 0..{processes - 1}")
    addresses = env.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "")
    coordinator = addresses.split(",")[0].strip() or None
    if coordinator is None and keras_vars:
        raise common.Error("KERAS_DISTRIBUTION_JOB_ADDRESSES",
                           "not set: give process 0's host:port")
    return Cluster(coordinator, processes, index)


def check_cluster(cfg, cluster, backend):
    """What a run over several processes needs, checked before any process waits for the others.
    backend: Keras's own answer (KERAS_BACKEND, else ~/.keras/keras.json)."""
    if backend != "jax":
        raise common.Error("KERAS_BACKEND", f"{backend}: a run over several processes needs "
                           "jax (JAX's distributed runtime; tf.distribute here covers one "
                           "TensorFlow host)")
    if cfg.batch % cluster.processes:
        raise common.Error(f"--batch {cfg.batch}", f"must be a multiple of the {cluster.processes} "
                           "processes (each loads an equal part of every batch)")
    if len(cfg.data or []) > 1:
        raise common.Error("--data", "several sources are validated per source in one process; "
                           "give one --data for a run over several processes")
    if cfg.distribute not in ("auto", "data_parallel"):
        raise common.Error(f"--distribute {cfg.distribute}",
                           "a run over several processes is data_parallel")


def peer_lost(cluster, timeout):
    """The one line for a cluster whose peer died or went silent."""
    return common.Error(f"process {cluster.index} of {cluster.processes}",
                        f"another process died or went silent for {timeout} s, so this one "
                        "stopped; rerun the same command on every host to resume after the last "
                        "finished epoch", exit_code=1)


def join_cluster(cluster, timeout):
    """Connect this process to the others through JAX's distributed runtime: after it, every device
    of every process is in keras.distribution.list_devices()."""
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives; GPUs: NCCL
    jax.distributed.initialize(cluster.coordinator, cluster.processes, cluster.index,
                               initialization_timeout=timeout, heartbeat_timeout_seconds=timeout)


def join(cfg, cluster, backend):
    """check_cluster, then join_cluster: train() calls it before JAX computes anything. Returns
    where this process writes: None for process 0 (it writes the run in --out); for 1.. a scratch
    folder of its own (train() deletes it at the end). They take every step process 0 takes, since
    saving a model is a collective step, and read the run from the shared --out."""
    check_cluster(cfg, cluster, backend)
    join_cluster(cluster, cfg.cluster_timeout)
    return scratch(cluster)


def scratch(cluster):
    """A scratch folder of this process's own, or None for process 0."""
    if cluster.index == 0:
        return None
    return tempfile.mkdtemp(prefix=f"skin-unet-process{cluster.index}-")


def main(run, script, argv, cluster, timeout):
    """train.py's main in a run over several processes: the process started by hand supervises
    (supervise); the child it starts joins the others and calls run() (run_worker). Exit code."""
    if WORKER_ENV not in os.environ:
        return supervise(script, argv, cluster, timeout)
    return run_worker(run, cluster, timeout)


def run_worker(run, cluster, timeout):
    """run() in the child process: a collective that fails because a peer is gone is one line
    (peer_lost), not a traceback."""
    try:
        return run()
    except Exception as e:
        if any(mark in str(e) for mark in PEER_LOST):
            raise peer_lost(cluster, timeout) from None
        raise


def supervise(script, argv, cluster, timeout):
    """Run `script argv` in a child process that joins the cluster, passing its output through.
    JAX's runtime ends a process whose peer died or never came with a fatal C++ log and a stack
    trace; here that becomes one line and exit 1. The child's own errors (exit 2) pass as they
    are."""
    child = subprocess.Popen([sys.executable, os.path.abspath(script), *argv],
                             stderr=subprocess.PIPE, env={**os.environ, WORKER_ENV: "1"},
                             text=True, errors="replace")
    fatal, said = "", False
    for line in child.stderr:
        if not fatal and "detected fatal errors" not in line \
                and not line.startswith("*** Check failure"):
            sys.stderr.write(line)
            sys.stderr.flush()
            said = said or line.startswith("error: ")
        else:
            fatal += line
    code = child.wait()
    if said or (not fatal and code >= 0):  # the child said what went wrong (or nothing did)
        return code if code > 0 or not said else 1
    who = f"process {cluster.index} of {cluster.processes}"
    if "RegisterTask" in fatal:  # the RPC that joins a process to the coordinator
        raise common.Error(who, f"the processes did not all join within {timeout} s (coordinator "
                           f"{cluster.coordinator or 'from SLURM'}): start the same command on "
                           "every host, check the address and port", exit_code=1)
    raise peer_lost(cluster, timeout)
