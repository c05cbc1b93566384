"""train.py: a tiny real run, resuming (in-process and after kill -9), MirroredStrategy, bad input,
no TensorFlow import under the JAX backend, the NaN guard, early stopping, the plateau schedule,
--steps-per-epoch, JAX data parallelism over two host devices and --ema."""
import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, TINY, free_port

import common
import curves
import data
import inference
import metrics
import train


def rows(out):
    with open(os.path.join(out, "log.csv")) as f:
        return list(csv.DictReader(f))


def curves_epochs(folder, name="curves.png"):
    """The epochs each run has in a curves picture (extras.curves.draw_curves writes them into the PNG)."""
    from PIL import Image

    with Image.open(os.path.join(folder, name)) as im:
        assert im.format == "PNG" and im.size[0] > 600
        return json.loads(im.text["Description"])["epochs"]


def cli(args, timeout=300, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, **kw)


@pytest.mark.slow
def test_two_epochs_write_model_log_and_run_json_then_resume(synthetic_data, tmp_path):
    out = str(tmp_path / "run")
    s = train.train(["--data", synthetic_data, "--epochs", "2", "--out", out, *TINY])
    assert s["epochs_done"] == 2 and s["best_epoch"] in (1, 2) and 0 <= s["val_dice"] <= 1
    log = rows(out)
    assert [r["epoch"] for r in log] == ["1", "2"]
    assert set(curves.LOG_FIELDS) <= set(log[0]) and all(float(r["images_per_sec"]) > 0 for r in log)
    assert float(log[1]["lr"]) < float(log[0]["lr"])  # cosine schedule
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["size"] == 32 and run["data"] == [synthetic_data] and run["val_fraction"] == 0.1
    assert run["data_summary"]["train"] > 0 and run["result"]["best_epoch"] == s["best_epoch"]
    # The review threshold stored with the model flags at most metrics.REVIEW_SHARE of val.
    # Worked out here from the maps predict.py makes of best.keras, not by the function train.py
    # calls: the stored threshold is one of the val photos' uncertainties, flags at most the
    # share, and is the lowest that does (the next lower value would flag more).
    val = data.load_split(synthetic_data, "val", 32, progress=False)
    u = np.sort(metrics.uncertainty(inference.load_predictor(os.path.join(out, "best.keras")).predict(val.images)))
    t = run["review_threshold"]
    assert np.isclose(u, t, atol=1e-6).any()
    assert np.mean(u > t + 1e-6) <= metrics.REVIEW_SHARE
    below = u[u < t - 1e-6]
    assert len(below) == 0 or np.mean(u > below[-1]) > metrics.REVIEW_SHARE
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    import keras
    best = keras.models.load_model(os.path.join(out, "best.keras"), compile=False)
    assert best.output_shape == (None, 32, 32, 1)
    assert curves_epochs(out) == {"run": 2}

    # same command with more epochs: continues at epoch 3, optimizer state included (Adam's step
    # count goes on from where it was, instead of starting again at 0)
    import unet  # noqa: F401  (registers the loss and metrics for load_model)
    steps = run["data_summary"]["train"] // 4  # full batches of 4 per epoch
    last = keras.models.load_model(os.path.join(out, "last.keras"))
    assert train.read_state(os.path.join(out, "last.keras"))["epoch"] == 2
    assert int(last.optimizer.iterations.numpy()) == 2 * steps
    s = train.train(["--data", synthetic_data, "--epochs", "3", "--out", out, *TINY])
    assert s["epochs_done"] == 3
    assert int(keras.models.load_model(os.path.join(out, "last.keras")).optimizer.iterations.numpy()) == 3 * steps
    assert [r["epoch"] for r in rows(out)] == ["1", "2", "3"]
    assert curves_epochs(out) == {"run": 3}  # redrawn after the resume, with the whole history
    # a finished run rerun is a no-op
    assert train.train(["--data", synthetic_data, "--epochs", "3", "--out", out, *TINY])["epochs_done"] == 3
    # another configuration in the same folder is refused (one line), unless --fresh
    with pytest.raises(common.Error, match="another configuration.*filters 4 -> 6.*--fresh"):
        train.train(["--data", synthetic_data, "--epochs", "3", "--out", out, *TINY, "--filters", "6"])
    s = train.train(["--data", synthetic_data, "--epochs", "1", "--out", out, *TINY, "--fresh",
                     "--schedule", "plateau", "--loss", "bce"])
    assert s["epochs_done"] == 1 and [r["epoch"] for r in rows(out)] == ["1"]


def test_fresh_leaves_nothing_of_the_old_run_to_be_listed_as_this_ones(tmp_path):
    # A --fresh run whose first epoch diverges must not list the old run's picture as its own.
    paths = train.run_paths(str(tmp_path))
    for path in paths.values():
        open(path, "w").close()
    cfg = train.config_of(["--out", str(tmp_path), "--fresh"])
    assert train.resume_or_start(cfg, paths)["epoch"] == 0
    assert sorted(os.listdir(tmp_path)) == ["run.json"]


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_resumes_without_duplicate_rows(synthetic_data, tmp_path):
    out = str(tmp_path / "run")
    args = ["--data", synthetic_data, "--epochs", "5", "--out", out, *TINY]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    # Kill as soon as epoch 1 is committed (state.json is written right after last.keras): the kill
    # lands in that epoch's remaining writes or early in epoch 2.
    while not os.path.exists(os.path.join(out, "state.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_jax_backend_imports_no_tensorflow():
    code = ("import sys, unet, data, train; data.Batches; import keras\n"
            "m = unet.compile_model(unet.build_unet(32, filters=4, depth=2))\n"
            "assert keras.backend.backend() == 'jax', keras.backend.backend()\n"
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'tf_keras'))\n"
            "assert not bad, bad[:5]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "KERAS_BACKEND": "jax",  # level 0: XLA CPU compile of the initializers
                            "XLA_FLAGS": "--xla_backend_optimization_level=0"})
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


def test_every_setting_has_one_home_config_makes_the_parser():
    import dataclasses

    p = train.parser()
    actions = {a.dest: a for a in p._actions if a.dest != "help"}
    assert set(actions) == {f.name for f in dataclasses.fields(train.Config)}
    assert vars(p.parse_args([])) == dataclasses.asdict(train.Config())  # one default per setting
    assert actions["augment"].option_strings == ["--no-augment"] and actions["cluster_timeout"].type is int
    assert train.config_of(p.parse_args(["--epochs", "3"])).epochs == 3  # a Namespace, or argv
    with pytest.raises(TypeError):
        train.config_of({"epochs": 3})


def test_empty_data_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "empty" in err


# --- the per-epoch guards, the schedules and the step cap ---------------------------------------------
# These runs skip XLA (--jit off): the behaviour under test is train.py's bookkeeping, and tracing
# without XLA costs a third of the time on the 2-core test machine.
QUICK = [*TINY, "--jit", "off", "--no-augment", "--verbose", "2"]


def run_json(out):
    with open(os.path.join(out, "run.json")) as f:
        return json.load(f)


def file_bytes(out, *names):
    result = {}
    for name in names:
        with open(os.path.join(out, name), "rb") as f:
            result[name] = f.read()
    return result


@pytest.fixture
def flat_val_dice(monkeypatch):
    """Every Dice the model reports is 0.5: validation Dice can never improve after epoch 1."""
    import unet

    monkeypatch.setattr(unet.DiceScore, "result", lambda self: self.total * 0.0 + 0.5)


def test_epoch_decision_is_a_pure_function_of_state_row_and_config():
    import copy

    def row(epoch, loss, val_dice=None):
        return {"epoch": epoch, "loss": loss, "val_loss": loss, "val_dice": val_dice, "val_iou": None}

    cfg = train.config_of(["--schedule", "plateau", "--patience", "5", "--lr", "0.01"])
    state = {"epoch": 0, "best": None, "wait": 0, "plateau_wait": 0, "lr": 0.01, "history": [], "stopped": None}
    seen, lrs = [], []
    for epoch, dice in enumerate([0.5, 0.6, 0.6, 0.55, 0.59, 0.58, 0.57], start=1):
        before = copy.deepcopy(state)
        new = train.epoch_decision(state, row(epoch, 1 - dice, dice), cfg)
        assert state == before  # pure: the caller's state is untouched
        state = {**state, **new}
        seen.append((state["best"]["epoch"], state["wait"], state["stopped"] is not None))
        lrs.append(state["lr"])
    # best at epoch 2 (0.6; the tie at 3 is no gain); 3 epochs without a gain halve the lr; 5 stop the run.
    assert seen == [(1, 0, False), (2, 0, False), (2, 1, False), (2, 2, False), (2, 3, False), (2, 4, False),
                    (2, 5, True)]
    assert lrs == [0.01] * 4 + [0.005] * 3 and [r["epoch"] for r in state["history"]] == list(range(1, 8))
    assert state["stopped"] == "early stopping: no val Dice gain for 5 epochs"
    # Without validation the score is minus the loss; the lr never drops below MIN_LR_FACTOR of --lr.
    low = {**state, "lr": 0.01 * train.MIN_LR_FACTOR, "plateau_wait": 2, "stopped": None, "wait": 0}
    new = train.epoch_decision(low, row(8, 0.45), cfg)  # score -0.45: no gain over the best's 0.6
    assert new["best"] == state["best"] and new["lr"] == 0.01 * train.MIN_LR_FACTOR and new["plateau_wait"] == 0
    fresh = {**low, "best": None}
    assert train.epoch_decision(fresh, row(8, 0.45), cfg)["best"]["score"] == -0.45
    # A non-finite loss: diverged, and nothing else moves (no epoch, no history row).
    new = train.epoch_decision(state, row(8, float("nan"), 0.9), cfg)
    assert new["diverged"].startswith("loss nan") and set(new) == {"diverged", "stopped"}
    # Without a schedule or patience nothing stops or halves.
    plain = train.config_of(["--patience", "0"])
    assert train.epoch_decision({**state, "stopped": None, "wait": 50}, row(8, 0.9, 0.1), plain)["stopped"] is None


@pytest.mark.slow
def test_nan_loss_stops_keeps_last_good_checkpoint_and_exits_1(synthetic_data, tmp_path, monkeypatch, capsys):
    import unet

    out = str(tmp_path / "run")
    args = ["--data", synthetic_data, "--out", out, *QUICK]
    first = train.train([*args, "--epochs", "1"])
    assert first["diverged"] is None and first["epochs_done"] == 1
    before = file_bytes(out, "best.keras", "last.keras", "log.csv")

    # From now on the loss is NaN (and with it the gradients, the weights and val_loss): the resumed
    # run's epoch 2 diverges deterministically.
    def nan_loss(y_true, y_pred):
        return unet.bce_dice(y_true, y_pred) * float("nan")

    monkeypatch.setitem(unet.LOSSES, "bce_dice", nan_loss)
    capsys.readouterr()
    assert train.main([*args, "--epochs", "4"]) == 1
    stdout = capsys.readouterr().out
    assert "Epoch 2/4" in stdout and "Epoch 3/4" not in stdout  # stopped right after the bad epoch
    assert "training diverged" in stdout and "the last good epoch is kept" in stdout

    summary = run_json(out)["result"]
    assert summary["diverged"] and "epoch 2" in summary["diverged"] and "nan" in summary["diverged"]
    assert summary["epochs_done"] == 1 and summary["best_epoch"] == 1
    assert file_bytes(out, "best.keras", "last.keras", "log.csv") == before  # nothing of epoch 2 committed
    assert train.read_state(os.path.join(out, "last.keras"))["epoch"] == 1
    with open(os.path.join(out, "state.json")) as f:
        assert json.load(f)["epoch"] == 1
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


@pytest.mark.slow
def test_early_stopping_when_val_dice_stops_improving(synthetic_data, tmp_path, flat_val_dice):
    out = str(tmp_path / "run")
    s = train.train(["--data", synthetic_data, "--out", out, *QUICK, "--epochs", "6", "--patience", "2",
                     "--steps-per-epoch", "1"])
    # epoch 1 sets the best; epochs 2 and 3 bring no gain: patience 2 is used up after epoch 3
    assert s["epochs_done"] == 3 and s["best_epoch"] == 1 and s["val_dice"] == 0.5
    assert s["stopped"] == "early stopping: no val Dice gain for 2 epochs" and s["diverged"] is None
    assert [r["epoch"] for r in rows(out)] == ["1", "2", "3"]
    assert train.read_state(os.path.join(out, "best.keras"))["epoch"] == 1
    # rerunning the same command keeps the decision instead of training on
    assert train.train(["--data", synthetic_data, "--out", out, *QUICK, "--epochs", "6", "--patience", "2",
                        "--steps-per-epoch", "1"])["epochs_done"] == 3


@pytest.mark.slow
def test_plateau_schedule_halves_lr_after_3_epochs_without_gain(synthetic_data, tmp_path, flat_val_dice):
    out = str(tmp_path / "run")
    s = train.train(["--data", synthetic_data, "--out", out, *QUICK, "--epochs", "8", "--lr", "0.01",
                     "--schedule", "plateau", "--patience", "0", "--steps-per-epoch", "1"])
    assert s["epochs_done"] == 8 and s["stopped"] is None  # --patience 0: no early stopping
    # epoch 1 is the best; 2, 3, 4 bring nothing -> halved from epoch 5; 5, 6, 7 nothing -> halved again
    assert [float(r["lr"]) for r in rows(out)] == [0.01] * 4 + [0.005] * 3 + [0.0025]


@pytest.mark.slow
def test_steps_per_epoch_caps_training_batches(synthetic_data, tmp_path):
    import keras

    import unet  # noqa: F401  (registers the loss and metrics for load_model)

    out = str(tmp_path / "run")
    s = train.train(["--data", synthetic_data, "--out", out, *QUICK, "--epochs", "2", "--steps-per-epoch", "2"])
    assert s["epochs_done"] == 2
    train_images = run_json(out)["data_summary"]["train"]
    assert train_images // 4 > 2  # uncapped, an epoch would be more batches of 4 than the cap
    # The optimizer counts every training step it took; last.keras stores that count.
    model = keras.models.load_model(os.path.join(out, "last.keras"))
    assert int(model.optimizer.iterations.numpy()) == 2 * 2


@pytest.mark.slow
def test_tensorboard_logs_every_epochs_scalars_and_plot_redraws_runs(synthetic_data, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {}
    for name, lr in (("a", "0.001"), ("b", "0.003")):
        runs[name] = str(tmp_path / name)
        assert train.main(["--data", synthetic_data, "--out", runs[name], *QUICK, "--epochs", "2", "--lr", lr,
                           "--tensorboard", str(tmp_path / "tb" / name)]) == 0
    # Read the events back: per epoch, the train and validation scalars and the learning rate.
    logged = {}
    for split in ("train", "validation"):
        events = EventAccumulator(str(tmp_path / "tb" / "a" / split))
        events.Reload()
        logged[split] = {tag: [float(e.tensor_proto.float_val[0]) if e.tensor_proto.float_val else
                               float(np.frombuffer(e.tensor_proto.tensor_content, np.float32)[0])
                               for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]}
    log = rows(runs["a"])
    assert {"epoch_loss", "epoch_dice", "epoch_iou", "epoch_learning_rate"} <= set(logged["train"])
    assert {"epoch_loss", "epoch_dice", "epoch_iou"} <= set(logged["validation"])
    assert logged["train"]["epoch_loss"] == pytest.approx([float(r["loss"]) for r in log], rel=1e-4)
    assert logged["validation"]["epoch_dice"] == pytest.approx([float(r["val_dice"]) for r in log], rel=1e-4)
    assert logged["train"]["epoch_learning_rate"] == pytest.approx([float(r["lr"]) for r in log], rel=1e-4)

    # --plot: one run redraws its own picture; several make one picture with a line set per run.
    os.remove(os.path.join(runs["a"], "curves.png"))
    assert train.main(["--plot", runs["a"]]) == 0 and curves_epochs(runs["a"]) == {"a": 2}
    both = str(tmp_path / "both")
    assert train.main(["--plot", runs["a"], runs["b"], "--out", both]) == 0
    assert curves_epochs(both) == {"a": 2, "b": 2}
    capsys.readouterr()
    assert train.main(["--plot", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nothing/log.csv: not found" in err


@pytest.mark.parametrize("content, problem", [
    (b"x,y\n1,2\n", "no epoch column"),
    (b"epoch,loss\n1,0.5,9\n", "line 2: more cells than the header"),
    (b"epoch,loss\n1,low\n", "could not convert string to float"),
    (b"\xff\xfe\x00e", "can't decode byte 0xff"),
], ids=["no-epoch-column", "extra-cell", "not-a-number", "not-utf8"])
def test_plot_of_a_bad_log_is_one_line(tmp_path, capsys, content, problem):
    (tmp_path / "log.csv").write_bytes(content)
    assert train.main(["--plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "log.csv: not a train.py log (" in err and problem in err
    assert not (tmp_path / "curves.png").exists()


def test_tensorboard_without_its_packages_stops_at_the_start_in_one_line(synthetic_data, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = str(tmp_path / "run")
    assert train.main(["--data", synthetic_data, "--out", out, *QUICK, "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --tensorboard: needs tensorboard (pip install tensorboard); TensorFlow writes the "
                   "event files on every Keras backend")
    assert not os.path.exists(os.path.join(out, "last.keras"))  # stopped before anything ran


@pytest.mark.slow
def test_xla_and_bfloat16_on_a_cpu_are_timed_on_long_runs_reported_and_overridden(synthetic_data, tmp_path, monkeypatch, capsys):
    import keras

    if keras.backend.backend() != "tensorflow" or train.accelerator() != "cpu":
        pytest.skip("the probe is for TensorFlow on a CPU")
    native_bf16 = train.precision_rule(train.config_of([]), "cpu", train.cpu_info()["flags"])[0] is None
    base = ["--data", synthetic_data, *TINY, "--no-augment", "--verbose", "0", "--epochs", "2"]
    # A short run does not pay for the probe: Keras's CPU default, said in the start line and run.json.
    train.train([*base, "--out", str(tmp_path / "short")])
    run = run_json(str(tmp_path / "short"))
    assert run["jit"] is False and "too short to probe" in run["jit_reason"] and run["probe"] is None
    assert run["precision"] == "float32"
    assert "float32 jit=False (Keras's CPU default" in capsys.readouterr().out
    assert set(run["cpu"]) == {"model", "flags", "cores"} and run["cpu"]["cores"] == os.cpu_count()
    # A long run (made so here) times every open setting and keeps the fastest, by the margin.
    monkeypatch.setattr(train, "PROBE_MIN_STEPS", 1)
    train.train([*base, "--out", str(tmp_path / "long")])
    run = run_json(str(tmp_path / "long"))
    rates = run["probe"]
    want = ["float32", "float32+xla"] + ["mixed_bfloat16", "mixed_bfloat16+xla"] * native_bf16
    assert list(rates) == want and all(r > 0 for r in rates.values())
    best = max(rates, key=rates.get)
    if rates[best] <= train.PROBE_MARGIN * rates["float32"]:
        best = "float32"
    assert (run["precision"], run["jit"]) == (best.split("+")[0], best.endswith("+xla"))
    assert run["jit_reason"].startswith("probe on this CPU: float32 ")
    assert f"{run['precision']} jit={run['jit']} (probe on this CPU" in capsys.readouterr().out
    last = train.read_state(str(tmp_path / "long" / "last.keras"))
    assert last["config"]["precision"] == run["precision"]  # a resumed run keeps it
    # --jit and --precision decide alone, with no probe.
    for flag, want in (("on", True), ("off", False)):
        train.train([*base, "--out", str(tmp_path / flag), "--jit", flag, "--precision", "float32"])
        run = run_json(str(tmp_path / flag))
        assert run["jit"] is want and run["jit_reason"] == f"--jit {flag}" and run["probe"] is None
        assert run["precision_reason"] == "--precision float32"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_jax_data_parallel_over_two_host_devices_matches_one_device(synthetic_data, tmp_path):
    # Both runs in one JAX process with 2 host CPU devices; the same seed gives the same initial
    # weights and batches, so data parallelism must only change where the work runs.
    # --val-fraction 0.5: 10 validation images, an even number, so both runs validate on all of them.
    outs = {mode: str(tmp_path / mode) for mode in ("none", "data_parallel")}
    args = ["--data", synthetic_data, "--epochs", "3", "--val-fraction", "0.5", "--lr", "0.003", *TINY,
            "--no-augment"]
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import train\n"
            f"for mode, out in {sorted(outs.items())!r}:\n"
            f"    if train.main({args!r} + ['--distribute', mode, '--out', out]):\n"
            f"        sys.exit(f'{{mode}} failed')\n")
    # Optimization level 0: XLA's CPU compile of each tiny initializer otherwise dominates (~45 s).
    env = {**os.environ, "KERAS_BACKEND": "jax",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = {mode: run_json(out) for mode, out in outs.items()}
    assert runs["data_parallel"]["distribute"] == "data_parallel" and runs["data_parallel"]["replicas"] == 2
    assert runs["none"]["distribute"] == "none" and runs["none"]["replicas"] == 1
    assert all(run["backend"] == "jax" and run["data_summary"]["val"] == 10 for run in runs.values())
    one, two = rows(outs["none"]), rows(outs["data_parallel"])
    assert len(one) == len(two) == 3
    # Sharding the global batch leaves the maths alone (batch norm still sees the whole batch): the two
    # logs agreed to 6 digits when this was written; the bounds leave room for summation order only.
    for a, b in zip(one, two):
        for key in ("loss", "val_loss"):
            assert math.isfinite(float(a[key])) and float(b[key]) == pytest.approx(float(a[key]), rel=0.01), key
        for key in ("dice", "val_dice"):
            assert 0 <= float(a[key]) <= 1 and 0 <= float(b[key]) <= 1, key
            assert abs(float(b[key]) - float(a[key])) < 0.02, key
    assert float(one[-1]["loss"]) < float(one[0]["loss"])  # it trained, on both
    assert float(two[-1]["loss"]) < float(two[0]["loss"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_jax_fit_with_device_augmentation_keeps_batches_on_the_device(synthetic_data, tmp_path):
    # 1. train.py with the accelerator's path (forced here, on the CPU) and matmul up-sampling. (Not
    #    --pool reshape: XLA:CPU at optimization level 0, used here for speed, miscompiles reduce_max's
    #    gradient to NaN; test_unet checks that form's gradients at the default level.)
    # 2. The batches fit's compiled step receives are the very device arrays the warp made: nothing
    #    copied them to the host and back. A feed that does round-trip them (the negative control) is seen.
    # 3. The warp on JAX gives the same pixels as Pillow for the same draws (the backend half of the
    #    parity test, which runs on the default backend in-process).
    out = str(tmp_path / "run")
    code = f"""
import sys; sys.path.insert(0, {ROOT!r})
import numpy as np, jax, keras, data, train, unet
from extras import device_augment, synthetic
rc = train.main({[*TINY, "--data", synthetic_data, "--epochs", "2", "--out", out, "--augment-on", "device",
                  "--upsample", "matmul", "--verbose", "0"]!r})
assert rc == 0, rc
images, masks = synthetic.make_synthetic(8, seed=0, size_wh=(32, 32))
batches = data.Batches(images, masks.astype(np.uint8), 4, drop_remainder=True)
warp = device_augment.device_warp(batches)

def steps_see(feed_warp):
    made, seen = [], []
    def recording(*drawn):
        out = feed_warp(*drawn)
        made.append(out[0])
        return out
    model = unet.compile_model(unet.build_unet(32, 4, 2))
    model.make_train_function()
    step = model.train_function
    def spy(state, iterator):  # what fit hands its compiled step
        batch = next(iterator)
        seen.append(batch[0])
        return step(state, iter([batch]))
    model.train_function = spy
    model.fit(data.feed(batches, 2, lambda i: recording(*batches.draw(i))), epochs=1, verbose=0)
    return made, seen

def untouched(made, seen):  # every batch the step got is a device array the warp made
    return len(seen) == 2 and all(isinstance(x, jax.Array) and any(x is m for m in made) for x in seen)

assert untouched(*steps_see(warp))
assert not untouched(*steps_see(lambda *a: tuple(np.asarray(t) for t in warp(*a))))
x, y, colour, affine = batches.draw(1)
xp, yp = data.warp_pillow(x, y[..., 0], colour, affine)
xd, yd = (np.asarray(t) for t in warp(x, y, colour, affine))
assert np.abs(xd.astype(int) - xp).max() <= 1 and np.array_equal(yd[..., 0], yp)
print("ok")
"""
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-1000:] + r.stderr[-3000:]
    run = run_json(out)
    assert run["augment_on"] == "device" and run["backend"] == "jax"
    assert (run["upsample"], run["pool"]) == ("matmul", "max") and len(rows(out)) == 2
    # A rerun with the stock forms is another network: refused, not resumed into the wrong layout.
    r = cli(["--data", synthetic_data, "--epochs", "3", "--out", out, *TINY, "--augment-on", "device"], timeout=120,
            env={**os.environ, "KERAS_BACKEND": "jax"})
    assert r.returncode == 2 and "upsample 'matmul' -> 'transpose'" in r.stderr


@pytest.fixture
def cluster_run():
    """cluster_run(args, port, processes=2, timeout=15, start=None): start train.py as processes 0..n-1
    (or those in `start`) of a local cluster (JAX's runtime, gloo on the CPU), each in its own session
    so a whole process can be killed; returns the Popen objects. Whatever still runs when the test
    ends (a failed assertion, a timeout) is killed with its children."""
    started = []

    def run(args, port, processes=2, timeout=15, start=None):
        env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_backend_optimization_level=0",
               "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
               "KERAS_DISTRIBUTION_NUM_PROCESSES": str(processes)}
        procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--cluster-timeout",
                                   str(timeout)], env={**env, "KERAS_DISTRIBUTION_PROCESS_ID": str(i)}, cwd=ROOT,
                                  text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
                 for i in (range(processes) if start is None else start)]
        started.extend(procs)
        return procs
    yield run
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def errors(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_two_processes_train_as_one_write_once_stop_together_and_resume(synthetic_data, tmp_path, cluster_run):
    # 1. Two processes (each its part of every batch, augmentation on) log what one process logs at the
    #    same global batch and seed; process 0 alone writes the run, and says how many take part.
    args = ["--data", synthetic_data, *TINY, "--val-fraction", "0.5", "--verbose", "0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r = cli([*args, "--epochs", "2", "--out", one], env={**os.environ, "KERAS_BACKEND": "jax",
                                                           "XLA_FLAGS": "--xla_backend_optimization_level=0"})
    assert r.returncode == 0, r.stderr[-2000:]
    procs = cluster_run([*args, "--epochs", "2", "--out", two], free_port())
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    # process 1 prints nothing of its own (gloo's C++ library says it is connected)
    assert "on 2 processes, 2 devices" in outs[0][0]
    assert [line for line in outs[1][0].splitlines() if not line.startswith("[Gloo]")] == []
    for a, b in zip(rows(one), rows(two)):  # the logs agreed to 5-6 digits when this was written
        for key in ("loss", "val_loss", "val_dice", "val_iou"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-3, abs=1e-4), key
    assert len(rows(two)) == 2 and sorted(os.listdir(two)) == sorted(os.listdir(one))
    assert run_json(two)["processes"] == 2 and run_json(two)["replicas"] == 2
    # 2. A process that dies mid-run: the other stops within the timeout, in one line; a rerun of the
    #    same command resumes both from the last finished epoch.
    port = free_port()
    procs = cluster_run([*args, "--epochs", "30", "--out", two], port, timeout=10)
    deadline = time.time() + 180
    while len(rows(two)) < 3 and time.time() < deadline and procs[0].poll() is None:  # one epoch past the 2
        time.sleep(0.1)
    os.killpg(procs[1].pid, signal.SIGKILL)
    procs[1].wait()
    t = time.time()
    out, err = procs[0].communicate(timeout=120)
    assert time.time() - t < 60 and procs[0].returncode == 1
    assert len(errors(err)) == 1 and "another process died" in errors(err)[0] and "Traceback" not in err
    done = int(rows(two)[-1]["epoch"])
    assert 3 <= done < 30
    procs = cluster_run([*args, "--epochs", str(done + 1), "--out", two], free_port())
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    assert f"resuming {two} after epoch {done}" in outs[0][0]
    assert [int(r["epoch"]) for r in rows(two)] == list(range(1, done + 2))
    # 3. Bad layouts are one line before anyone waits: a batch the processes cannot split, a coordinator
    #    nobody starts.
    procs = cluster_run([*args, "--epochs", "1", "--out", str(tmp_path / "x"), "--batch", "3"], free_port())
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert all(errors(err) == ["error: --batch 3: must be a multiple of the 2 processes (each loads an equal "
                               "part of every batch)"] for _, err in outs)
    lone, = cluster_run([*args, "--epochs", "1", "--out", str(tmp_path / "y")], free_port(), timeout=5, start=[1])
    _, err = lone.communicate(timeout=120)
    assert lone.returncode == 1 and len(errors(err)) == 1 and "did not all join within 5 s" in err


def test_a_checkpoint_whose_weights_do_not_load_is_one_line_exit_2(synthetic_data, tmp_path, capsys):
    import zipfile

    out = str(tmp_path / "run")
    args = ["--data", synthetic_data, "--out", out, *QUICK]
    assert train.main([*args, "--epochs", "1"]) == 0
    last = os.path.join(out, "last.keras")
    with zipfile.ZipFile(last) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    weights = next(n for n in entries if n.endswith(".h5"))
    entries[weights] = b"not an h5 file"  # the resume state entry stays readable
    with zipfile.ZipFile(last, "w") as z:
        for name, blob in entries.items():
            z.writestr(name, blob)
    capsys.readouterr()
    assert train.main([*args, "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {last}: cannot load its weights") and "\n" not in err and "--fresh" in err


@pytest.mark.slow
def test_ema_validates_and_saves_the_average_and_keeps_it_for_resuming(synthetic_data, tmp_path):
    import keras
    import numpy as np

    from extras import ema

    with pytest.raises(common.Error, match=r"--ema 1.0: must be in \[0, 1\)"):
        train.config_of(["--ema", "1"])
    out = str(tmp_path / "run")
    args = ["--data", synthetic_data, "--out", out, "--ema", "0.5", "--val-fraction", "0.3", *TINY]
    train.train([*args, "--epochs", "1"])
    best, last = (keras.models.load_model(os.path.join(out, f)) for f in ("best.keras", "last.keras"))
    # last.keras: the trained weights, with the average inside its optimizer state (what a resume reads);
    # best.keras: the average itself
    trained = [v.numpy() for v in last.trainable_weights]
    with ema.averaged(last):
        averaged = [v.numpy() for v in last.trainable_weights]
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(averaged, best.trainable_weights))
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(trained, last.trainable_weights))  # swapped back
    assert not all(np.allclose(a, b) for a, b in zip(averaged, trained))
    # the logged validation scores are the average's, not the trained weights'
    val = data.load_split(synthetic_data, "val", size=32, val_fraction=0.3, progress=False)
    logged = float(rows(out)[0]["val_loss"])
    scores = [m.evaluate(val.images, val.masks[..., None], batch_size=4, verbose=0, return_dict=True)["loss"]
              for m in (best, last)]
    assert scores[0] == pytest.approx(logged, rel=1e-4) and scores[1] != pytest.approx(logged, rel=1e-4)
    # resumes with the average; a run without --ema is another configuration
    assert train.train([*args, "--epochs", "2"])["epochs_done"] == 2
    with pytest.raises(common.Error, match="another configuration.*ema 0.5 -> 0.0"):
        train.train([*args[:4], *args[6:], "--epochs", "3"])


# --- --minutes: the schedule fitted into a wall-clock budget ------------------------------------
def test_minutes_fits_the_schedule_into_the_budget_and_a_resume_keeps_it(synthetic_data, tmp_path,
                                                                          capsys):
    out, minutes = str(tmp_path / "run"), 0.4
    # --patience 0: early stopping would end a tiny run before its budget (a separate rule).
    args = ["--data", synthetic_data, "--out", out, *TINY, "--epochs", "500", "--patience", "0",
            "--minutes", str(minutes), "--verbose", "0"]
    s = train.train(args)
    with open(os.path.join(out, "run.json")) as f:
        budget = json.load(f)["budget"]
    n = budget["epochs"]
    assert budget["minutes"] == minutes and 2 <= n < 500
    assert s["epochs_done"] == n and s["stopped"] == f"the --minutes 0.4 budget: {n} epochs"
    # Within the budget, from the start of training (plus the estimate's error: each epoch's time
    # varies on a busy machine).
    assert s["train_seconds"] <= minutes * 60 * 1.3 + 5, (s["train_seconds"], budget)
    # The cosine schedule was laid over the n epochs: its last epoch's lr is the schedule's end.
    lrs = [float(r["lr"]) for r in rows(out)]
    end = 1e-3 * train.MIN_LR_FACTOR + 0.5 * 1e-3 * (1 - train.MIN_LR_FACTOR) * (
        1 + math.cos(math.pi * (n - 1) / n))
    assert len(lrs) == n and lrs[-1] == pytest.approx(end, rel=1e-5)
    assert lrs[-1] < lrs[1] / 10  # near the low point, not mid-schedule
    assert "fit the budget" in capsys.readouterr().out
    # Resumed (here: rerun after the end) with another --minutes: the stored budget holds.
    again = train.train([*args[:-4], "--minutes", "5", "--verbose", "0"])
    assert again["epochs_done"] == n and len(rows(out)) == n


def test_minutes_must_not_be_negative(capsys):
    assert train.main(["--minutes", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --minutes -1.0: must be >= 0 (0: off)"
