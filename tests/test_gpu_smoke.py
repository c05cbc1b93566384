"""bench/gpu.sh smoke: every step of the GPU check at toy sizes on this CPU, so the prepared command
cannot rot while no GPU machine is available."""
import json
import os
import subprocess
import sys
import tarfile

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # a module of minutes: the full suite runs it, the inner loop does not

pytest.importorskip("jax")  # the GPU machine runs Keras on JAX; so does the smoke


def test_gpu_smoke_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "SHARED": str(tmp_path / "no-shared")}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "smoke", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # What comes back from the GPU machine: few files (the limit is 8, 16 MiB each), every figure in gpu.json.
    assert sorted(os.listdir(out)) == ["best.keras.part0", "gpu.json", "gpu.log", "runs.tar.gz"]
    report = json.loads((out / "gpu.json").read_text())
    assert report["backend"] == "jax" and report["tiny"] is True and "cores" in report["cpu"]
    assert report["peer"]["skipped"]  # torch is absent here (or the peer script is): said, not crashed
    assert report["ratio_to_peer"] is None
    speed = report["train_py"]
    assert speed["images_per_s"] > 0 and len(speed["epochs"]) == 2  # one log.csv row per epoch
    assert speed["augment_on"] == "host"  # train.py's choice on a CPU
    for variant in ("stock", "both", "matmul", "reshape", "no_metrics"):
        assert report["step"][variant]["images_per_s"] > 0, variant
    assert "skipped" in report["step"]["torch"] or report["step"]["torch"]["images_per_s"] > 0
    assert report["feed"]["host_1_thread"] > 0 and report["feed"]["device_augment"] > 0
    assert report["top_ops"] and all(op["ms"] >= 0 for op in report["top_ops"])
    acc = report["accuracy"]
    assert acc["variant"] in ("stock", "both", "matmul", "reshape")
    assert acc["train_exit"] == 0 and acc["epochs_done"] == 2
    assert (acc["val"]["images"], acc["test"]["images"], acc["isic2017_fullres"]["images"]) == (1, 6, 3)
    for split in ("val", "test", "isic2017_fullres"):
        assert 0.0 <= acc[split]["threshold_jaccard"] <= acc[split]["jaccard"] <= acc[split]["dice"] <= 1.0
    assert set(report["seconds"]) >= {"train_py", "feed", "accuracy", "total"}

    # The converged model comes back in parts; joined, it loads in a bare session.
    joined = tmp_path / "best.keras"
    joined.write_bytes(b"".join((out / n).read_bytes() for n in sorted(os.listdir(out)) if ".part" in n))
    code = ("import sys, keras; m = keras.models.load_model(sys.argv[1], compile=False); "
            "print(m.count_params())")
    r = subprocess.run([sys.executable, "-c", code, str(joined)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "KERAS_BACKEND": "jax"})
    assert r.returncode == 0 and int(r.stdout.split()[-1]) == acc["params"], r.stderr[-2000:]

    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    for run in ("speed", "converged"):
        assert f"{run}/log.csv" in names and f"{run}/run.json" in names
    for split in ("val", "test", "isic2017_fullres"):
        assert f"converged/eval_{split}/summary.json" in names
    assert not any("cache" in n for n in names)

    # The table printed for the README reads from the same JSON.
    table = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_bench.py"), "table",
                            str(out / "gpu.json")], capture_output=True, text=True, check=True).stdout
    assert "| train.py end to end" in table and "| step alone, both" in table and "| test |" in table
