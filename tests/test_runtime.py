"""train.py's machine section: the run's machine settings resolved once into a frozen Runtime (what run.json
records), the precision and XLA rules, and the probe that decides what they leave open (bfloat16 on a CPU
that computes it natively, XLA for TensorFlow on a CPU): faster wins by the margin, slower loses, a short
run and a resumed one are not probed."""
import contextlib
import dataclasses
import time

import keras
import numpy as np
import pytest

import common
import train


def test_setup_resolves_one_frozen_runtime_that_run_json_records_as_before():
    keras = common.import_keras()
    cfg = train.config_of(["--jit", "off", "--distribute", "none", "--precision", "float32"])
    scope, rt = train.setup(cfg)
    try:
        with pytest.raises(dataclasses.FrozenInstanceError):
            rt.jit = True
        # run.json's keys, in order; probe stays None until a probe runs
        assert list(dataclasses.asdict(rt)) == ["backend", "accelerator", "cpu", "precision", "precision_reason",
                                                "jit", "jit_reason", "distribute", "replicas", "processes",
                                                "process", "augment_on", "probe"]
        assert rt.backend == keras.backend.backend() and rt.jit is False and rt.probe is None
        assert (rt.precision, rt.precision_reason) == ("float32", "--precision float32")
        assert (rt.replicas, rt.processes, rt.process, rt.distribute) == (1, 1, 0, "none")
        assert set(rt.cpu) == {"model", "flags", "cores"}
        assert scope is contextlib.nullcontext  # no strategy on one device
    finally:
        train.reset(rt)


def _runtime(precision=None, jit=None):
    return train.Runtime(backend="tensorflow", accelerator="cpu", cpu={}, precision=precision,
                         precision_reason="a rule", jit=jit, jit_reason="a rule", distribute="none", replicas=1,
                         processes=1, process=0, augment_on="host")


FRESH, RESUMED = {"epoch": 0, "config": {}}, {"epoch": 3, "config": {"precision": "mixed_bfloat16"}}


def test_settle_gives_a_new_runtime_and_leaves_the_old_one_alone():
    rt = _runtime()
    cfg = train.config_of([])
    try:
        short = train.settle(rt, cfg, train.PROBE_MIN_STEPS - 1, None, None, FRESH)
        assert (short.precision, short.jit, short.probe) == ("float32", False, None)
        assert "too short to probe" in short.precision_reason and "too short to probe" in short.jit_reason
        assert rt.jit is None and rt.precision is None  # a new value, not the old one changed
        decided = _runtime("float32", True)
        assert train.settle(decided, cfg, 10 ** 6, None, None, FRESH) == decided  # nothing to probe
        # A resumed run keeps the precision it began with (a probe now could choose otherwise).
        resumed = train.settle(_runtime(jit=False), cfg, train.PROBE_MIN_STEPS - 1, None, None, RESUMED)
        assert resumed.precision == "mixed_bfloat16" and resumed.precision_reason == "as the run in --out began"
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("flags, accel, want", [
    (["avx2", "avx512f", "avx512_bf16"], "cpu", None),  # native bfloat16: the probe decides
    (["avx2", "amx_tile"], "cpu", None),
    (["avx2", "avx512f"], "cpu", "float32"),  # emulated bfloat16 is slower than float32
    ([], "cpu", "float32"),
    ([], "gpu", "mixed_bfloat16")])
def test_precision_rule(flags, accel, want):
    precision, why = train.precision_rule(train.config_of([]), accel, flags)
    assert precision == want and why
    for flag in ("float32", "mixed_bfloat16"):  # --precision decides alone
        assert train.precision_rule(train.config_of(["--precision", flag]), accel, flags) == (flag, f"--precision {flag}")


class FakeModel:
    """A model whose step takes as long as `seconds` says for the precision it was built under and
    its XLA setting: the probe's timing, without training anything."""

    def __init__(self, seconds, jit):
        self.seconds = seconds[keras.mixed_precision.global_policy().name, jit]

    def train_on_batch(self, x, y):
        time.sleep(self.seconds)


@pytest.mark.parametrize("bf16, xla, want", [
    (0.004, 0.012, ("mixed_bfloat16", False)),  # bfloat16 faster: chosen
    (0.016, 0.012, ("float32", False)),  # bfloat16 slower: float32 stays
    (0.0098, 0.012, ("float32", False)),  # faster, but within the margin: the default stays
    (0.016, 0.004, ("float32", True))])  # XLA faster
def test_the_probe_picks_the_fastest_setting_by_the_margin(monkeypatch, bf16, xla, want):
    seconds = {("float32", False): 0.01, ("float32", True): xla, ("mixed_bfloat16", False): bf16,
               ("mixed_bfloat16", True): max(bf16, xla) * 1.5}
    monkeypatch.setattr(train, "compiled_model", lambda cfg, jit: FakeModel(seconds, jit))
    x = np.zeros((4, 8, 8, 3), np.uint8)
    try:
        rt = train.settle(_runtime(), train.config_of([]), train.PROBE_MIN_STEPS, x, x, FRESH)
        assert (rt.precision, rt.jit) == want
        assert keras.mixed_precision.global_policy().name == want[0]  # the real model is built in it
        assert list(rt.probe) == ["float32", "float32+xla", "mixed_bfloat16", "mixed_bfloat16+xla"]
        assert rt.precision_reason == rt.jit_reason and rt.jit_reason.startswith("probe on this CPU: float32 ")
        # Where XLA is decided by its rule, only the precision is probed.
        rt = train.settle(_runtime(jit=False), train.config_of([]), train.PROBE_MIN_STEPS, x, x, FRESH)
        assert list(rt.probe) == ["float32", "mixed_bfloat16"] and rt.jit_reason == "a rule"
        assert rt.precision == ("mixed_bfloat16" if bf16 < 0.01 / train.PROBE_MARGIN else "float32")
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("flag, want", [("on", True), ("off", False)])
def test_jit_flag_decides_alone(flag, want):
    cfg = train.config_of(["--jit", flag])
    assert train.jit_rule(cfg, "cpu", "none") == (want, f"--jit {flag}")
