"""Image rows and labeled grids (paper style), drawn with PIL."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw


def image_row(images: Sequence[Image.Image], gap: int = 2) -> Image.Image:
    """Images side by side on white."""
    w, h = images[0].size
    row = Image.new("RGB", (len(images) * w + (len(images) - 1) * gap, h), "white")
    for i, img in enumerate(images):
        row.paste(img, (i * (w + gap), 0))
    return row


def labeled_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str],
                 scale: int = 1, gap: int = 2) -> Image.Image:
    """A grid of images with a label left of each row and above each column (a column label's lines, split at
    ``\n``, are each wrapped to the column's width)."""
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    label_w = max(8 * max(len(s) for s in row_labels) + 8, 40)
    wrapped = [[line for part in text.split("\n") for line in textwrap.wrap(part, max(4, w // 6)) or [""]]
               for text in col_labels]
    label_h = 12 * max(len(lines) for lines in wrapped) + 6
    grid = Image.new("RGB", (label_w + len(col_labels) * (w + gap), label_h + len(rows) * (h + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for j, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((label_w + j * (w + gap) + 2, 2 + 12 * k), line, fill="black")
    for i, (label, images) in enumerate(zip(row_labels, rows)):
        y = label_h + i * (h + gap)
        draw.text((4, y + h // 2 - 6), label, fill="black")
        for j, img in enumerate(images):
            grid.paste(img.resize((w, h), Image.Resampling.NEAREST), (label_w + j * (w + gap), y))
    return grid
