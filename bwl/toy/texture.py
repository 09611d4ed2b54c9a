"""A transparent texture statistic: how much of a head carries a texture's white cells, with no training.

The world's textures paint white cells on a 4 px grid (period 8 px): stripes, checker, dots and hatching
(:data:`~bwl.toy.world.TEXTURES`). For one image and one texture:

1. **head region**: pixels unlike the background (the median colour of the image's border), plus the white pixels
   that closing with a 5 px window adds (white cells on a white background), eroded by 1 px; dark ink (eyes, hat)
   and the pixels next to it are left out, so no pixel of the region is blended with something else. On a white
   background the white space between a head's arms joins the region, so white backgrounds read less reliably;
2. **whiteness** of each pixel in the region: 0 below 200 in its darkest channel, 1 above 235, linear between;
3. **fit of the textures**: each texture's ideal pattern is placed at the best of its 64 phases (the one it
   correlates best with the whiteness at), then the region's whiteness is fitted by least squares on all the world's
   textures at once plus a constant, with no texture's coefficient below 0 (checker is stripes plus columns less
   twice dots, so a free fit could trade one for the others). A texture's statistic is its coefficient, capped at 1.

A head wholly in the texture scores about 1, a flat one 0, and one painted on a fraction ``c`` of its area about
``c`` (the coefficient is linear in the covered fraction). Fitting the textures jointly keeps apart the ones that
share cells: a striped head holds the white cells of dots too, but stripes explain it whole, so dots get about 0.
It reads the pattern only: a white blotch without the period does not count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from bwl.toy.world import TEXTURES

VERSION = 1  # part of the probe family's scorer version: raise it when the statistic changes
CELL = 4  # px, at 32 px
PERIOD = 2 * CELL


def pattern(texture: str, size: int, dx: int = 0, dy: int = 0) -> np.ndarray:
    """The texture's ideal white cells (1) on a ``size`` grid, shifted by (dx, dy) pixels."""
    y, x = np.mgrid[0:size, 0:size]
    x, y = x + dx, y + dy
    column, row = x // CELL, y // CELL
    cells = {
        "stripes": row % 2 == 1,
        "checker": (column + row) % 2 == 1,
        "dots": (column % 2 == 1) & (row % 2 == 1),
        "hatch": ((x + y) // CELL) % 2 == 1,
    }
    if texture not in cells:
        raise ValueError(f"unknown texture {texture!r}; valid: {', '.join(TEXTURES)}")
    return cells[texture].astype(float)


def head_region(image: Image.Image) -> np.ndarray:
    """Pixels of the character's head: unlike the border's median colour, holes up to 4 px closed, ink left out."""
    rgb = np.asarray(image.convert("RGB"), dtype=float)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.abs(rgb - background).max(-1) > 40
    mask = Image.fromarray((foreground * 255).astype(np.uint8))
    closed = mask.filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.MinFilter(5))
    inner = np.asarray(closed.filter(ImageFilter.MinFilter(3))) > 127  # no pixel blended with the background
    ink = Image.fromarray(((rgb.max(-1) < 90) * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3))
    # closing also fills concavities (between arms, under the hat): there only white pixels are kept
    return inner & (foreground | (whiteness(image) > 0.5)) & ~(np.asarray(ink) > 127)


def whiteness(image: Image.Image) -> np.ndarray:
    """0 where a pixel's darkest channel is below 200, 1 above 235, linear between."""
    darkest = np.asarray(image.convert("RGB"), dtype=float).min(-1)
    return np.clip((darkest - 200) / 35, 0, 1)


def _best_phase(white: np.ndarray, texture: str, region: np.ndarray) -> np.ndarray:
    """The texture's ideal pattern (region pixels only) at the phase that correlates best with the whiteness."""
    size, best, best_score = white.shape[0], None, -np.inf
    centered = white[region] - white[region].mean()
    for dy in range(PERIOD):
        for dx in range(PERIOD):
            ideal = pattern(texture, size, dx, dy)[region]
            score = float(centered @ (ideal - ideal.mean()))
            if score > best_score:
                best, best_score = ideal, score
    return best


def nonnegative_fit(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares of ``target`` on ``design``'s columns with every coefficient >= 0 except the last (a constant),
    by trying every subset of the columns (a handful here): the best fit among those whose coefficients are all
    non-negative."""
    columns = design.shape[1] - 1
    best, best_residual = np.zeros(columns + 1), np.inf
    for mask in range(1 << columns):
        chosen = [i for i in range(columns) if mask >> i & 1] + [columns]
        solution = np.linalg.lstsq(design[:, chosen], target, rcond=None)[0]
        if (solution[:-1] < 0).any():
            continue
        residual = float(np.sum((design[:, chosen] @ solution - target) ** 2))
        if residual < best_residual - 1e-12:
            best = np.zeros(columns + 1)
            best[chosen] = solution
            best_residual = residual
    return best


def texture_fit(image: Image.Image, textures: Sequence[str] = TEXTURES) -> dict[str, float]:
    """Each texture's coefficient in the joint non-negative fit of the head's whiteness (see the module), <= 1."""
    region = head_region(image)
    if region.sum() < PERIOD * CELL:  # no head to speak of
        return dict.fromkeys(textures, 0.0)
    white = whiteness(image)
    design = np.column_stack([_best_phase(white, t, region) for t in textures] + [np.ones(int(region.sum()))])
    coefficients = nonnegative_fit(design, white[region])
    return {t: float(min(c, 1.0)) for t, c in zip(textures, coefficients)}


def texture_energy(image: Image.Image, texture: str, among: Sequence[str] = TEXTURES) -> float:
    """One texture's statistic (:func:`texture_fit`), fitted jointly with the textures ``among`` (those the images'
    model could draw: a texture it never learnt must not take credit for another's cells)."""
    return texture_fit(image, tuple(dict.fromkeys([*among, texture])))[texture]


def texture_energies(images: Sequence[Image.Image], texture: str) -> list[float]:
    """:func:`texture_energy` of each image."""
    return [texture_energy(image, texture) for image in images]
