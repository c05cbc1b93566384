"""The exported files on emulated 64-bit ARM CPUs (bench/arm_check.py, QEMU user mode from
bench/arm_setup.sh): the same masks as on this x86 machine, from the kernels a phone would run.

A small U-Net (64 px, base 4, depth 3) is trained briefly on the synthetic fixture and exported to
float32 and int8; both run on 3 synthetic dermoscopy images and 1 of noise, here and on four CPU
models at 1 and 2 threads. About 20 s of emulation. Without the setup the test skips, unless CI is
set (.ci/run sets it up and sets CI): then it fails."""
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli

import export

sys.path.insert(0, os.path.join(ROOT, "bench"))

import arm_check  # noqa: E402  (bench/ is not a package)

SIZE = 64
CPUS = ("cortex-a53", "cortex-a55", "cortex-a76", "cortex-a710")


@pytest.fixture(scope="module")
def exported(train_unet, synthetic_data, tmp_path_factory):
    """{"float32": path, "int8": path} of a model trained enough for confident, non-trivial masks."""
    model = train_unet(SIZE, filters=4, depth=3)
    folder = tmp_path_factory.mktemp("arm")
    model.save(folder / "best.keras")
    export.export(str(folder / "best.keras"), synthetic_data, str(folder / "export"), quantize=("int8",),
                  threads=(1,), calibration=20, bench_runs=1, progress=False)
    return {kind: str(folder / "export" / f"model_{kind}.tflite") for kind in ("float32", "int8")}


@pytest.fixture(scope="module")
def emulator():
    if not os.path.isfile(os.path.join(arm_check.arm_dir(), "stamp")):
        if os.environ.get("CI"):
            pytest.fail(f"{arm_check.arm_dir()}: no ARM emulator in CI (.ci/run runs bench/arm_setup.sh)")
        pytest.skip(f"no ARM emulator in {arm_check.arm_dir()} (bash bench/arm_setup.sh, ~20 s); CI runs this test")
    return arm_check.arm_dir()


@pytest.mark.slow  # ~45 s: training, export, four emulated CPUs
def test_same_masks_on_emulated_arm_cpus(emulator, exported, tmp_path, capsys):
    out = tmp_path / "arm.json"
    # The user's command, in-process: both files, the four CPUs, 1 and 2 threads, the default images.
    rc, printed, _ = run_cli(arm_check, [exported["float32"], exported["int8"], "--cpus", ",".join(CPUS),
                                         "--threads", "1,2", "--json", str(out)], capsys)
    assert rc == 0, printed
    assert "agree: 2 file(s) on 4 emulated CPU(s)" in printed
    result = json.loads(out.read_text())
    reference, rows = result["reference"], result["rows"]

    # The masks are worth agreeing on: lesion and background both present (not "both empty").
    assert reference["images"] == 4 and reference["size"] == SIZE
    for fraction in reference["lesion_fraction"].values():
        assert 0.05 < fraction < 0.95
    # Every file on every CPU at both thread counts, plus this machine at 2 threads.
    assert len(rows) == 2 * (len(CPUS) * 2 + 1)
    assert {(r["cpu"], r["threads"]) for r in rows if r["file"] == "model_int8.tflite"} == \
        {(c, t) for c in CPUS for t in (1, 2)} | {(f"{platform.machine()} (this machine)", 2)}

    for r in rows:
        assert r["mask_pixels"] == 4 * SIZE * SIZE
        if r["integer"]:
            # int32 accumulation is exact in any order and every kernel requantizes the same way,
            # so the int8 file's output bytes (not only its masks) are those of x86.
            assert r["identical"] and r["max_abs_diff"] == 0 and r["mask_pixels_differing"] == 0, r
        else:
            # float32 kernels sum in another order and use FMA: close, not identical.
            assert r["max_abs_diff"] <= 1e-5, r

    # The CPUs really ran different int8 kernels: the emulated code shows each one's family.
    kernels = {cpu: f["instructions"] for cpu, f in reference["cpus"].items()}
    assert kernels["cortex-a53"]["smlal"] > 0 and kernels["cortex-a53"]["sdot"] == 0  # no dot product
    for cpu in ("cortex-a55", "cortex-a76"):
        assert kernels[cpu]["sdot"] > 0 and kernels[cpu]["smmla"] == 0
    assert kernels["cortex-a710"]["smmla"] > 0  # i8mm
    assert all(k["sme"] == 0 for k in kernels.values())
    features = {cpu: f["features"] for cpu, f in reference["cpus"].items()}
    assert "asimddp" not in features["cortex-a53"] and "sve2" in features["cortex-a710"]


@pytest.mark.slow  # the trained, exported model
def test_a_changed_pixel_is_reported(exported):
    """The comparison itself, no emulator: one output byte moved across the threshold is one mask pixel."""
    import arm_guest

    images = arm_check.check_images(SIZE, count=2)
    outputs, _ = arm_guest.run([exported["int8"]], images, [1])
    reference = outputs["0/1"]
    assert reference.dtype == np.uint8
    changed = reference.copy()
    changed.flat[0] = 200 if changed.flat[0] <= 128 else 10
    row = arm_check.compare(exported["int8"], reference, changed)
    assert not row["identical"] and row["mask_pixels_differing"] == 1
    assert row["max_abs_diff"] == pytest.approx(abs(int(changed.flat[0]) - int(reference.flat[0])) / 256)
    rows = [{"file": "model_int8.tflite", "cpu": "cortex-a76", "threads": 1, "integer": True, **row}]
    assert arm_check.failures(rows, int8_pixels=1) == []
    assert arm_check.failures(rows) == [("model_int8.tflite on cortex-a76 at 1 thread(s)",
                                         "1 mask pixels differ (allowed 0)")]
    assert arm_check.compare(exported["int8"], reference, reference.copy())["identical"]


@pytest.mark.parametrize("args, message", [
    (["--cpus", "pentium"], "unknown CPU model"),
    (["--threads", "0"], "thread counts start at 1"),
])
def test_bad_flags_are_one_line_errors(args, message, tmp_path, capsys):
    model = tmp_path / "m.tflite"
    model.write_bytes(b"not a model")
    code, _, err = run_cli(arm_check, [str(model), *args], capsys)
    err = err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_missing_setup_and_bad_files_are_one_line_errors(tmp_path):
    env = {**os.environ, "SKIN_UNET_ARM": str(tmp_path / "nowhere")}
    script = os.path.join(ROOT, "bench", "arm_check.py")

    def run(*args):
        proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        return lines[0]

    assert "no ARM emulator set up (run: bash bench/arm_setup.sh)" in run(str(tmp_path))
    env["SKIN_UNET_ARM"] = str(tmp_path)  # a folder that looks set up: the model files are checked next
    (tmp_path / "stamp").write_text("test")
    (tmp_path / "notes.txt").write_text("x")
    assert f"{tmp_path / 'notes.txt'}: expected a .tflite file" in run(str(tmp_path / "notes.txt"))
    assert "no .tflite files in this folder" in run(str(tmp_path))
    (tmp_path / "bad.tflite").write_bytes(b"not a model")
    assert "bad.tflite: cannot load TFLite model" in run(str(tmp_path / "bad.tflite"))
