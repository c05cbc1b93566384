"""bench/gpu.sh smoke: every step of the GPU check at toy sizes on this CPU, so the prepared command
cannot rot while no GPU machine is available."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("jax")  # the GPU machine runs Keras on JAX; so does the smoke


def test_gpu_smoke_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "SHARED": str(tmp_path / "no-shared")}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "smoke", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # What comes back from the GPU machine: few files (the limit is 8), every figure in gpu.json.
    assert sorted(os.listdir(out)) == ["best_filters12.keras", "gpu.json", "gpu.log", "runs.tar.gz"]
    report = json.loads((out / "gpu.json").read_text())
    assert report["backend"] == "jax" and report["tiny"] is True
    assert report["peer"]["skipped"]  # torch is absent here (or the peer script is): said, not crashed
    for key in ("feed", "step", "train_py"):
        assert report[key]["8"] > 0, key
    assert report["ratio_to_peer"] == {"8": None}
    assert len(report["train_py_epochs"]["8"]) == 2  # one log.csv row per epoch, the rate from the 2nd
    assert set(report["accuracy"]) == {"filters12", "filters4"}
    for name, acc in report["accuracy"].items():
        assert acc["train_exit"] == 0 and acc["epochs_done"] == 2, name
        assert (acc["val"]["images"], acc["test"]["images"], acc["isic2017_fullres"]["images"]) == (1, 6, 3)
        for split in ("val", "test", "isic2017_fullres"):
            assert 0.0 <= acc[split]["threshold_jaccard"] <= acc[split]["jaccard"] <= acc[split]["dice"] <= 1.0
    assert report["accuracy"]["filters12"]["params"] > report["accuracy"]["filters4"]["params"]

    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    for run in ("speed_b8", "filters12", "filters4"):
        assert f"{run}/log.csv" in names and f"{run}/run.json" in names
    for split in ("val", "test", "isic2017_fullres"):
        assert f"filters12/eval_{split}/summary.json" in names
    assert not any("cache" in n for n in names)

    # The table printed for the README reads from the same JSON.
    table = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_bench.py"), "table",
                            str(out / "gpu.json")], capture_output=True, text=True, check=True).stdout
    assert "| 8 |" in table and "| filters12 |" in table
