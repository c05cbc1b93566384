"""extras/qat.py: export.py --qat's child process (`python -m extras.qat`) and how its failures
reach export.py as one line. The QAT export itself (files, frozen batch norm) is test_export.py's."""
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT

import common
from extras import qat


class FakeModel:
    """Just what run_qat reads of a Keras model: its config and its layers' weights."""

    def __init__(self, layers):
        self.cfg = {"layers": layers, "input_layers": [["image", 0, 0]],
                    "output_layers": [[layers[-1]["name"], 0, 0]]}
        self.layers = []

    def get_config(self):
        return self.cfg


def image_layer():
    return {"class_name": "InputLayer", "name": "image", "config": {"batch_shape": [None, 8, 8, 3]},
            "inbound_nodes": []}


def train_set():
    return SimpleNamespace(images=np.zeros((2, 8, 8, 3), np.uint8), masks=np.zeros((2, 8, 8), np.uint8))


def run_child(*argv):
    return subprocess.run([sys.executable, "-m", "extras.qat", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_child_bad_arguments_are_one_line_errors(tmp_path):
    for argv, says in (((), "folder"), ((str(tmp_path),), "not a QAT folder")):
        proc = run_child(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert says in lines[0] and "Traceback" not in proc.stderr


def test_a_nested_model_is_refused_before_the_child_starts(tmp_path):
    encoder = {"class_name": "Functional", "name": "resnet50_encoder", "config": {}, "inbound_nodes": []}
    with pytest.raises(common.Error, match="--qat: supports the plain U-Net only") as caught:
        qat.run_qat(FakeModel([image_layer(), encoder]), train_set(), 8, 1, str(tmp_path))
    assert caught.value.exit_code == 2 and not (tmp_path / "qat").exists()


@pytest.mark.slow  # the child imports TensorFlow and tfmot
def test_a_layer_tf_keras_lacks_is_the_childs_one_line_error(tmp_path):
    mystery = {"class_name": "NoSuchLayer", "name": "mystery", "config": {},
               "inbound_nodes": [{"args": [], "kwargs": {}}]}
    with pytest.raises(common.Error) as caught:
        qat.run_qat(FakeModel([image_layer(), mystery]), train_set(), 8, 1, str(tmp_path), images=1)
    assert str(caught.value) == ("--qat: the child process failed: QAT: layer mystery (NoSuchLayer) "
                                 "has no tf_keras equivalent")
    assert caught.value.exit_code == 1  # a failure during the run, as export.py's other checks
    spec = json.load(open(tmp_path / "qat" / "graph.json"))  # what the child was given
    assert spec["epochs"] == 1 and spec["size"] == 8
    assert len(np.load(tmp_path / "qat" / "train.npz")["images"]) == 1  # images=1 of 2
