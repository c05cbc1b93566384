"""--minutes M: fit the whole schedule into a wall-clock budget, counted from the start of training
(after the start-up: imports, loading the data, building the model). After the first epoch,
train.py knows what an epoch costs on this machine (its steady-state time: the first step's
compilation left out) and how much of the budget that epoch took; the epochs that fit in what is
left become the run's length, so the cosine schedule reaches its low point as the
budget runs out. --epochs stays the most. The decision is kept in the resume state (a resumed run
keeps its budget), printed, and written to run.json ("budget").
"""


def plan(minutes, spent, epoch_seconds, most):
    """{"minutes", "epochs", "epoch_seconds", "spent_seconds"}: 1 + the whole epochs of
    epoch_seconds that fit in the budget after `spent` seconds (at least 1, at most `most`)."""
    left = minutes * 60 - spent
    fit = int(left // epoch_seconds) if epoch_seconds > 0 else most
    return {"minutes": minutes, "epochs": max(1, min(most, 1 + fit)),
            "epoch_seconds": round(epoch_seconds, 2), "spent_seconds": round(spent, 1)}
