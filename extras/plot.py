"""`train.py --plot RUN [RUN ...]`: curves.png drawn again from log.csv files alone, without Keras:
RUN/curves.png for one run, else one picture with a line set per run (named by its folder) in
--out (default: here). It reads log.csv back, the file curves.py writes after every epoch.
"""
import csv
import os

import common
import curves


def read_log(path):
    """log.csv as rows of numbers (None where a cell is empty), as the resume state holds them."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if "epoch" not in (reader.fieldnames or ()):
                raise ValueError("no epoch column")
            rows = []
            for row in reader:
                if None in row:  # DictReader files a row's extra cells under the key None
                    raise ValueError(f"line {reader.line_num}: more cells than the header")
                rows.append({k: None if v in ("", None) else int(v) if k == "epoch" else float(v)
                             for k, v in row.items()})
            return rows
    except FileNotFoundError:
        raise common.Error(path, "not found (a run folder holds log.csv after its first "
                           "epoch)") from None
    except (ValueError, csv.Error) as e:
        raise common.Error(path, f"not a train.py log ({common.one_line(e)})") from None


def plot_runs(folders, out=None):
    """Draw and say what was drawn; returns the exit code (0)."""
    folders = [os.path.abspath(f) for f in folders]
    runs = [(os.path.basename(f) or f, read_log(os.path.join(f, "log.csv"))) for f in folders]
    path = os.path.join(out or (folders[0] if len(folders) == 1 else "."), "curves.png")
    try:
        drawn = curves.draw_curves(path, runs)
    except ImportError:
        raise common.Error("--plot", "needs matplotlib (pip install matplotlib)") from None
    print(f"wrote {path} ({', '.join(f'{k}: {n} epochs' for k, n in drawn.items())})")
    return 0
