"""train.py's machine section: the run's machine settings resolved once into a frozen Runtime (what run.json
records), the XLA rule and the short-run decision that skips the probe."""
import contextlib
import dataclasses

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
        # run.json's keys, in the order it always had them; jit_probe only once a probe ran
        assert list(rt.record()) == ["backend", "accelerator", "cpu", "precision", "jit", "jit_reason",
                                     "distribute", "replicas", "processes", "process", "augment_on"]
        assert rt.record()["backend"] == keras.backend.backend() and rt.jit is False
        assert (rt.replicas, rt.processes, rt.process, rt.distribute) == (1, 1, 0, "none")
        assert set(rt.cpu) == {"model", "flags", "cores"}
        assert scope is contextlib.nullcontext  # no strategy on one device
    finally:
        train.reset(rt)


def test_settle_jit_gives_a_new_runtime_and_leaves_the_old_one_alone():
    rt = train.Runtime(backend="tensorflow", accelerator="cpu", cpu={}, precision="float32", jit=None,
                         jit_reason="TensorFlow on a CPU", distribute="none", replicas=1, processes=1,
                         process=0, augment_on="host")
    cfg = train.config_of([])
    short = train.settle_jit(rt, cfg, train.XLA_PROBE_MIN_STEPS - 1, None, None)
    assert short.jit is False and "too short to probe" in short.jit_reason and short.jit_probe is None
    assert rt.jit is None  # a new value, not the old one changed
    decided = dataclasses.replace(rt, jit=True, jit_reason="--jit on")
    assert train.settle_jit(decided, cfg, 10 ** 6, None, None) is decided  # nothing to probe
    probed = dataclasses.replace(rt, jit=False, jit_probe={"xla": 1.0, "no_xla": 2.0})
    assert probed.record()["jit_probe"] == {"xla": 1.0, "no_xla": 2.0}


@pytest.mark.parametrize("flag, want", [("on", True), ("off", False)])
def test_jit_flag_decides_alone(flag, want):
    cfg = train.config_of(["--jit", flag])
    assert train.jit_rule(cfg, "cpu", "none") == (want, f"--jit {flag}")
