"""--minutes M: fit the whole schedule into a wall-clock budget, counted from the start of training
(after the start-up: imports, loading the data, building the model). After the first epoch,
train.py knows what an epoch costs on this machine (its steady-state time: the first step's
compilation left out) and how much of the budget that epoch took; the epochs that fit in what is
left become the run's length, so the cosine schedule reaches its low point as the
budget runs out. --epochs stays the most. The decision is kept in the resume state (a resumed run
keeps its budget), printed, and written to run.json ("budget").
"""
import time


def plan(minutes, spent, epoch_seconds, most):
    """{"minutes", "epochs", "epoch_seconds", "spent_seconds"}: 1 + the whole epochs of
    epoch_seconds that fit in the budget after `spent` seconds (at least 1, at most `most`)."""
    left = minutes * 60 - spent
    fit = int(left // epoch_seconds) if epoch_seconds > 0 else most
    return {"minutes": minutes, "epochs": max(1, min(most, 1 + fit)),
            "epoch_seconds": round(epoch_seconds, 2), "spent_seconds": round(spent, 1)}


def plan_once(run, trained, steady_trained):
    """After a --minutes run's first epoch: plan, keep the decision in run.state["budget"] and say
    it (process 0). trained: the seconds that epoch's training batches took; steady_trained: the
    same at the images/s measured from the second step, so without the first step's compile."""
    cfg = run.cfg
    steady = run.row["seconds"] - trained + steady_trained
    run.state["budget"] = plan(cfg.minutes, time.time() - run.started, steady, cfg.epochs)
    if run.chief:
        b = run.state["budget"]
        print(f"--minutes {cfg.minutes:g}: {b['epochs']} epochs of about "
              f"{b['epoch_seconds']:.1f} s fit the budget", flush=True)
