"""The comparison grids evaluate.py writes with --out: grid_best.png, grid_worst.png and
grid_random.png, GRID_ROWS rows each of image | ground truth | prediction | overlay.

evaluate.py always writes them beside metrics.csv: unlike the other extras, the default path calls
this module (evaluate() imports it when it has an `out` folder). It is a module of its own because
it is a self-contained piece with a narrow interface: the scoring workers shrink each image's masks
with thumbnails(), evaluate() offers every scored row to one GridPicker in image order, and
GridPicker.write() draws and writes the kept rows at the end.
"""
import heapq
import os
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import common
import data

GRID_ROWS = 6          # images per comparison grid (best / worst / random)
TILE = 256             # px per grid tile: large enough to see a lesion border
TP_COLOR, FP_COLOR, FN_COLOR = (0, 200, 0), (255, 0, 255), (0, 160, 255)  # green, magenta, azure


def _fit(array, mode, box=TILE):
    """Letterbox an array into a box x box tile, keeping the native aspect ratio."""
    image = Image.fromarray(array)
    h, w = image.height, image.width
    scale = box / max(h, w)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    # A grey letterbox: the black background of a mask stays visible against it.
    tile = Image.new(mode, (box, box), (96, 96, 96))
    tile.paste(image.convert(mode), ((box - image.width) // 2, (box - image.height) // 2))
    return tile


def thumbnails(truth, pred):
    """Truth and prediction shrunk to grid-tile size (native aspect), a few kB per image."""
    h, w = truth.shape
    scale = TILE / max(h, w)
    hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    # Stride down a 12-megapixel mask first (a view, no copy): the area-preserving resize then
    # works on the small mask instead of making a pass over all of it.
    step = max(1, min(h // hw[0], w // hw[1]) // 2)
    return data.resize_mask(truth[::step, ::step], hw), data.resize_mask(pred[::step, ::step], hw)


def make_tiles(image, truth_small, pred_small):
    """The four tiles of one grid row: image | ground truth | prediction | overlay."""
    image = data.resize_image(image, truth_small.shape)  # squashed back to the native aspect
    overlay = (image * 0.55).astype(np.uint8)
    overlay[truth_small & pred_small] = TP_COLOR
    overlay[~truth_small & pred_small] = FP_COLOR
    overlay[truth_small & ~pred_small] = FN_COLOR
    return [_fit(image, "RGB"), _fit(truth_small.astype(np.uint8) * 255, "RGB"),
            _fit(pred_small.astype(np.uint8) * 255, "RGB"), _fit(overlay, "RGB")]


def _font(size=14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def draw_grid(title, entries):
    """entries: [(row dict, tiles)] -> one PNG-ready image with a caption above every row."""
    font, caption, header = _font(14), 22, 30
    width = 4 * TILE
    grid = Image.new("RGB", (width, header + len(entries) * (caption + TILE)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), f"{title}   columns: image | ground truth | prediction | overlay "
              "(green TP, magenta FP, blue FN)", fill=(0, 0, 0), font=font)
    for i, (row, tiles) in enumerate(entries):
        y = header + i * (caption + TILE)
        caption_text = (f"{row['image_id']}   Dice {row['dice']:.3f}   Jaccard "
                        f"{row['jaccard']:.3f}   {row['width']}x{row['height']}")
        draw.text((6, y + 4), caption_text, fill=(0, 0, 0), font=font)
        for j, tile in enumerate(tiles):
            grid.paste(tile, (j * TILE, y + caption))
    return grid


class GridPicker:
    """Keeps tiles only for the images that can still end up in a grid: the best, the worst and
    a seeded reservoir sample, so memory stays flat however large the split."""

    def __init__(self, rows=GRID_ROWS, seed=0):
        self.rows, self.rng, self.seen = rows, random.Random(seed), 0
        self.best, self.worst, self.sample = [], [], []  # heaps of (key, order, row, tiles)

    def offer(self, row, make_tiles):
        """One scored row, in image order. make_tiles() is called only when the row is kept;
        returns whether it was."""
        # Reservoir sampling: the n-th row takes a random one of the sample's slots with chance
        # rows / n, so every row is equally likely to end up in the random grid.
        slot = self.rng.randrange(self.seen + 1) if self.seen >= self.rows else self.seen
        self.seen += 1
        ranked = ((self.best, row["dice"]), (self.worst, -row["dice"]))
        if slot >= self.rows and all(len(h) >= self.rows and k <= h[0][0] for h, k in ranked):
            return False
        tiles = make_tiles()
        for heap, key in ranked:
            item = (key, -self.seen, row, tiles)  # the later of two equal rows ranks lower
            if len(heap) < self.rows:
                heapq.heappush(heap, item)
            elif key > heap[0][0]:
                heapq.heapreplace(heap, item)
        if slot < len(self.sample):
            self.sample[slot] = (row, tiles)
        elif slot < self.rows:
            self.sample.append((row, tiles))
        return True

    def grids(self):
        best = [(r, t) for _, _, r, t in sorted(self.best, key=lambda e: (-e[0], -e[1]))]
        worst = [(r, t) for _, _, r, t in sorted(self.worst, key=lambda e: (-e[0], -e[1]))]
        sample = sorted(self.sample, key=lambda e: e[0]["image_id"])
        return {"grid_best.png": ("Best images", best), "grid_worst.png": ("Worst images", worst),
                "grid_random.png": ("Random sample", sample)}

    def write(self, folder):
        """Each grid that has rows, as a PNG in `folder`, whole or not at all."""
        for name, (title, entries) in self.grids().items():
            if entries:
                grid = draw_grid(title, entries)
                common.atomic_write(os.path.join(folder, name),
                                    lambda f: grid.save(f, format="PNG", compress_level=1))
