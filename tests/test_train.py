"""train.py: a tiny real run, resuming (in-process and after kill -9), MirroredStrategy, bad input,
and no TensorFlow import under the JAX backend."""
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--size", "32", "--filters", "4", "--depth", "2", "--batch", "4", "--workers", "2"]


def rows(out):
    with open(os.path.join(out, "log.csv")) as f:
        return list(csv.DictReader(f))


def cli(args, timeout=300, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, **kw)


def test_two_epochs_write_model_log_and_run_json_then_resume(synthetic_data, tmp_path):
    out = str(tmp_path / "run")
    s = train.train(["--data", synthetic_data, "--epochs", "2", "--out", out, *TINY])
    assert s["epochs_done"] == 2 and s["best_epoch"] in (1, 2) and 0 <= s["val_dice"] <= 1
    log = rows(out)
    assert [r["epoch"] for r in log] == ["1", "2"]
    assert set(train.LOG_FIELDS) <= set(log[0]) and all(float(r["images_per_sec"]) > 0 for r in log)
    assert float(log[1]["lr"]) < float(log[0]["lr"])  # cosine schedule
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["size"] == 32 and run["data"] == synthetic_data and run["val_fraction"] == 0.1
    assert run["data_summary"]["train"] > 0 and run["result"]["best_epoch"] == s["best_epoch"]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    import keras
    best = keras.models.load_model(os.path.join(out, "best.keras"), compile=False)
    assert best.output_shape == (None, 32, 32, 1)

    # same command with more epochs: continues at epoch 3, optimizer state included
    iterations = train.read_state(os.path.join(out, "last.keras"))["epoch"]
    s = train.train(["--data", synthetic_data, "--epochs", "3", "--out", out, *TINY])
    assert s["epochs_done"] == 3 and iterations == 2
    assert [r["epoch"] for r in rows(out)] == ["1", "2", "3"]
    # a finished run rerun is a no-op
    assert train.train(["--data", synthetic_data, "--epochs", "3", "--out", out, *TINY])["epochs_done"] == 3
    # another configuration in the same folder is refused (one line), unless --fresh
    with pytest.raises(train.UsageError, match="another configuration.*filters 4 -> 6.*--fresh"):
        train.train(["--data", synthetic_data, "--epochs", "3", "--out", out, *TINY, "--filters", "6"])
    s = train.train(["--data", synthetic_data, "--epochs", "1", "--out", out, *TINY, "--fresh",
                     "--schedule", "plateau", "--loss", "bce"])
    assert s["epochs_done"] == 1 and [r["epoch"] for r in rows(out)] == ["1"]


def test_kill_9_mid_run_then_rerun_resumes_without_duplicate_rows(synthetic_data, tmp_path):
    out = str(tmp_path / "run")
    args = ["--data", synthetic_data, "--epochs", "5", "--out", out, *TINY]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(out, "state.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside epoch 2 or its checkpoint writes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = train.read_state(os.path.join(out, "last.keras"))["epoch"]
    assert 1 <= killed_at < 5
    r = cli(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {out} after epoch {killed_at}" in r.stdout
    assert [row["epoch"] for row in rows(out)] == ["1", "2", "3", "4", "5"]
    assert train.read_state(os.path.join(out, "best.keras"))["epoch"] >= 1
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_mirrored_strategy_over_two_logical_cpus(synthetic_data, tmp_path):
    out = str(tmp_path / "run")
    code = ("import sys, tensorflow as tf\n"
            "cpu = tf.config.list_physical_devices('CPU')[0]\n"
            "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
            f"sys.path.insert(0, {ROOT!r})\n"
            "import train\n"
            "sys.exit(train.main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "--data", synthetic_data, "--epochs", "1", "--out", out,
                        "--distribute", "mirrored", "--val-fraction", "0.3", *TINY], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["distribute"] == "mirrored" and run["replicas"] == 2
    assert len(rows(out)) == 1


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_jax_backend_imports_no_tensorflow():
    code = ("import sys, unet, data, train; data.Batches; import keras\n"
            "m = unet.compile_model(unet.build_unet(32, filters=4, depth=2))\n"
            "assert keras.backend.backend() == 'jax', keras.backend.backend()\n"
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'tf_keras'))\n"
            "assert not bad, bad[:5]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "KERAS_BACKEND": "jax"})
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("args,needle", [
    (["--data", "/nonexistent/isic"], "/nonexistent/isic: data folder not found"),
    (["--loss", "focal"], "--loss: invalid choice: 'focal'"),
    (["--size", "100"], "--size 100: must be a multiple of 2**depth = 16"),
    (["--epochs", "0"], "--epochs 0: must be a positive integer"),
    (["--out", "/proc/version/out"], "/proc/version/out: output folder is not writable"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    r = cli(args, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and needle in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_empty_data_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "empty" in err
