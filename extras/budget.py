"""--minutes M: fit the whole schedule into a wall-clock budget, counted from the start of training
(after the start-up: imports, loading the data, building the model). After the first epoch, the
callback knows what an epoch costs on this machine (its steady-state time: the first step's
compilation left out) and how much of the budget that epoch took; the epochs that fit in what is
left become the run's length, so the cosine schedule reaches its low point as the budget runs
out. --epochs stays the most. train.py keeps the decision in the resume state (a resumed run keeps
its budget, handed back as `plan`), stops there and writes it to run.json ("budget").
"""
import time


def plan(minutes, spent, epoch_seconds, most):
    """{"minutes", "epochs", "epoch_seconds", "spent_seconds"}: 1 + the whole epochs of
    epoch_seconds that fit in the budget after `spent` seconds (at least 1, at most `most`)."""
    left = minutes * 60 - spent
    fit = int(left // epoch_seconds) if epoch_seconds > 0 else most
    return {"minutes": minutes, "epochs": max(1, min(most, 1 + fit)),
            "epoch_seconds": round(epoch_seconds, 2), "spent_seconds": round(spent, 1)}


def callback(minutes, most, started, say=True, earlier=None):
    """A Keras callback that plans after the first epoch and hands the plan on in every epoch's
    logs as "budget" (train.py's epoch jobs keep it). started: time.time() as fit began; say: print
    the decision (process 0); earlier: a resumed run's plan, kept as it is. It reads the epoch's
    train_seconds and steady_train_seconds, which train.py's clock puts in the logs before it."""
    import keras

    class Budget(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.plan = earlier

        def on_epoch_begin(self, epoch, logs=None):
            self.begin = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if self.plan is None:
                seconds = time.perf_counter() - self.begin
                steady = seconds - logs["train_seconds"] + logs["steady_train_seconds"]
                self.plan = plan(minutes, time.time() - started, steady, most)
                if say:
                    print(f"--minutes {minutes:g}: {self.plan['epochs']} epochs of about "
                          f"{self.plan['epoch_seconds']:.1f} s fit the budget", flush=True)
            logs["budget"] = self.plan

    return Budget()
