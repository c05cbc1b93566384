"""Resuming a run: what train.py does when --out already holds a last.keras (and no --fresh).

The resume state (epoch, best score, schedule and early-stopping counters, the log rows) is an
extra entry inside last.keras itself (train.save_model / train.read_state), so weights and state
cannot disagree. A run resumes only under the configuration that made it: a changed setting that
defines the run (the weights' shape, the data stream) is one line naming it; --fresh starts over.
train.py names this module where it reads an earlier run's state, and where it loads its weights.
"""
import common
import layouts


def check_same_run(state, identity, defaults, path):
    """One line naming every setting of `identity` that differs from the run stored in `path`."""
    # A key that a run from before it existed lacks had its default value then.
    earlier = {k: state.get("config", {}).get(k, default) for k, default in defaults.items()}
    # "data" compared as a list: a run stored as one path resumes from the same single --data.
    # precision None: --precision auto left to train.py's probe, which keeps the earlier run's.
    changed = [k for k in defaults if (k != "precision" or identity[k] is not None) and (
        layouts.folders_of(earlier[k]) != layouts.folders_of(identity[k]) if k == "data"
        else earlier[k] != identity[k])]
    if changed:
        diff = "; ".join(f"{k} {earlier[k]!r} -> {identity[k]!r}" for k in changed)
        raise common.Error(path, f"holds a run with another configuration ({diff}); "
                           "rerun with --fresh to discard it, or use another --out")


def load_weights(model, path):
    """Weights and optimizer state of last.keras into the freshly compiled model."""
    model.optimizer.build(model.trainable_variables)
    try:
        model.load_weights(path)
    except Exception as e:  # its state entry reads, its weights do not: damaged or edited
        raise common.Error(path, f"cannot load its weights to resume ({common.one_line(e)}); "
                           "rerun with --fresh to start over") from None


def best_behind(state, best):
    """Whether best.keras (whose stored state is `best`, None if it has none) missed the last
    epoch's improvement: a kill between the commit (last.keras) and the end of the epoch's jobs.
    (state.json and log.csv are rewritten from the state on every resume.)"""
    improved = state["best"] is not None and state["best"]["epoch"] == state["epoch"]
    return improved and (best is None or best["epoch"] != state["epoch"])
