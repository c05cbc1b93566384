"""extras/grids.py: the picker keeps the best, the worst and a seeded sample, and makes tiles only
for the rows it keeps. The grids evaluate.py writes are checked end to end in tests/test_evaluate.py."""
import random

from evaluate import GridPicker


def test_grid_picker_keeps_best_worst_and_sample():
    picker = GridPicker(rows=3, seed=0)
    dices = [random.Random(5).random() for _ in range(1)] + [i / 20 for i in range(20)]
    for i, d in enumerate(dices):
        row = {"image_id": f"ISIC_{i:07d}", "dice": d, "jaccard": d, "height": 4, "width": 4}
        picker.offer(row, lambda: [None])
    grids = picker.grids()
    best = [r["dice"] for r, _ in grids["grid_best.png"][1]]
    worst = [r["dice"] for r, _ in grids["grid_worst.png"][1]]
    assert best == sorted(dices, reverse=True)[:3]
    assert worst == sorted(dices)[:3]
    assert len(grids["grid_random.png"][1]) == 3


def test_grid_picker_makes_tiles_only_for_the_rows_it_keeps():
    # Tiles cost a resize per image: a row that can no longer reach a grid never gets them.
    picker = GridPicker(rows=3, seed=0)
    made = []
    dices = [0.0, 1.0] * 3 + [0.5] * 60  # best and worst full first; then only the sample can take
    kept = [picker.offer({"image_id": f"ISIC_{i:07d}", "dice": d}, lambda i=i: made.append(i) or [i])
            for i, d in enumerate(dices)]
    assert made == [i for i, k in enumerate(kept) if k]
    assert 6 < len(made) < len(dices)  # the first six, then a few sample draws, not all 66
    grids = picker.grids()
    assert [r["dice"] for r, _ in grids["grid_best.png"][1]] == [1.0] * 3
    assert [r["dice"] for r, _ in grids["grid_worst.png"][1]] == [0.0] * 3
    assert all(tiles == [int(r["image_id"][5:])] for r, tiles in grids["grid_random.png"][1])
