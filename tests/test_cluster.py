"""extras/cluster.py: where this process stands in a run over several processes, read from the
environment (keras.distribution's variables, else SLURM's); train.py looks at it only when they are set.
The real multi-process runs are in test_train.py."""
import subprocess
import sys

import pytest
from conftest import ROOT

import common
from extras import cluster


def test_one_process_is_no_cluster():
    assert cluster.cluster_of({}) is None
    assert cluster.cluster_of({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None


def test_keras_and_slurm_variables():
    env = {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "1",
           "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234,10.0.0.2:1234"}
    assert cluster.cluster_of(env) == cluster.Cluster("10.0.0.1:1234", 2, 1)
    assert cluster.cluster_of({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"}) == cluster.Cluster(None, 4, 3)


@pytest.mark.parametrize("env, needle", [
    ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "two"}, "not whole numbers"),
    ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "2",
      "KERAS_DISTRIBUTION_JOB_ADDRESSES": "h:1"}, "2 is not a process of 0..1"),
    ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "0"}, "give process 0's host:port"),
])
def test_bad_variables_are_one_line(env, needle):
    with pytest.raises(common.Error, match=needle):
        cluster.cluster_of(env)


def test_import_train_leaves_the_extras_alone():
    # train.py brings in an extras module only when its flag or input asks for it; nor does it
    # import the optional libraries (or Keras) by itself.
    code = ("import sys, train\n"
            "assert train.cluster_place() is None\n"
            "loaded = sorted(k for k in sys.modules if k.startswith('extras') or k.split('.')[0] in "
            "('keras', 'matplotlib', 'tensorboard', 'h5py', 'tf_keras', 'tensorflow_model_optimization', 'gradio'))\n"
            "assert loaded == [], loaded\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("KERAS_DISTRIBUTION_", "SLURM_"))}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_process_0_writes_the_run_the_others_a_scratch_folder_of_their_own():
    import os

    assert cluster.scratch(cluster.Cluster("h:1", 2, 0)) is None
    folder = cluster.scratch(cluster.Cluster("h:1", 2, 1))
    try:
        assert os.path.isdir(folder) and os.listdir(folder) == [] and "process1" in folder
    finally:
        os.rmdir(folder)


def test_the_child_turns_a_lost_peer_into_one_line_and_passes_the_rest():
    place = cluster.Cluster("h:1", 2, 1)
    assert cluster.run_worker(lambda: 7, place, 5) == 7

    def fails(message):
        def run():
            raise RuntimeError(message)
        return run

    with pytest.raises(common.Error, match="process 1 of 2: another process died or went silent for 5 s") as e:
        cluster.run_worker(fails("Gloo connectFullMesh: Connection closed by peer"), place, 5)
    assert e.value.exit_code == 1
    with pytest.raises(RuntimeError, match="something else"):
        cluster.run_worker(fails("something else"), place, 5)
