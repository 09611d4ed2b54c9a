"""The toy world: procedural characters with exact labels and tag captions, and two held-out concepts.

A character is a head (shape, color) with eyes and a hat, drawn in a rendering style on a background, at 32 px.
Every feature is bold enough to survive a factor-2 VAE: eyes are >= 3 px, style textures sit on a 4 px grid.

Held out from pretraining (the U-Net and text encoder never see them; the VAE and the probes do):

- the identity ``zkc``: a plus-shaped head (a shape never seen), orange, with a cap and round eyes;
- the style ``qrv``: a 4 px checker rendering (a texture never seen).

For replication there are more held-out concepts (:data:`REPLICATE_SHAPES`, :data:`REPLICATE_STYLES`): star and
heart heads, and white dots or diagonal hatching on the same 4 px grid; :mod:`bwl.toy.concepts` makes identities and
styles of them. No sampler of pretraining draws them. The probes read them (they are in :data:`ATTRIBUTES`); the
shipped VAE was trained before they existed and is measured on them (``python -m bwl probes``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32
_SCALE = 4  # drawn at 128 px, then downsampled for antialiasing

SHAPES = ("circle", "square", "triangle", "diamond")
HELD_OUT_SHAPE = "plus"
COLORS = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (145, 55, 190), "orange": (245, 130, 20),
}
HATS = ("none", "cap", "tophat")
EYES = ("round", "sleepy")
STYLES = ("flat", "outline", "stripes")
HELD_OUT_STYLE = "checker"
REPLICATE_SHAPES = ("star", "heart")  # held out too, for replicated findings
REPLICATE_STYLES = ("dots", "hatch")
TEXTURES = ("stripes", HELD_OUT_STYLE, *REPLICATE_STYLES)  # the styles that paint white cells on the 4 px grid
DRAWN_TEXTURES = ("stripes", HELD_OUT_STYLE)  # those the toy study's model can draw: the seen one and the style
BACKGROUNDS = {
    "white": (245, 245, 245), "gray": (150, 150, 150), "pink": (250, 185, 205),
    "sky": (165, 205, 250), "mint": (175, 238, 195),
}

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES + (HELD_OUT_SHAPE, *REPLICATE_SHAPES),
    "color": tuple(COLORS),
    "hat": HATS,
    "eyes": EYES,
    "style": STYLES + (HELD_OUT_STYLE, *REPLICATE_STYLES),
    "background": tuple(BACKGROUNDS),
}

IDENTITY_TRIGGER = "zkc"
STYLE_TRIGGER = "qrv"
IDENTITY = {"shape": HELD_OUT_SHAPE, "color": "orange", "hat": "cap", "eyes": "round"}
IDENTITY_BACKGROUNDS = ("white", "gray")  # the identity's training photos; prompts ask for the others
INK = (30, 30, 30)


@dataclass(frozen=True)
class Character:
    """Exact labels of one image."""

    shape: str
    color: str
    hat: str
    eyes: str
    style: str
    background: str

    def tags(self) -> list[str]:
        """The tag caption's tags, in the world's canonical order."""
        return [
            self.shape, self.color, "no hat" if self.hat == "none" else self.hat,
            f"{self.eyes} eyes", self.style, f"{self.background} background",
        ]

    def caption(self) -> str:
        return ", ".join(self.tags())

    def labels(self) -> dict[str, str]:
        return asdict(self)


def tag_attribute(tag: str) -> tuple[str, str] | None:
    """The (attribute, value) a tag names, or None for tags outside the world (triggers, free words)."""
    tag = tag.strip()
    if tag == "no hat":
        return "hat", "none"
    if tag.endswith(" eyes") and tag[:-5] in EYES:
        return "eyes", tag[:-5]
    if tag.endswith(" background") and tag[:-11] in BACKGROUNDS:
        return "background", tag[:-11]
    for attribute, values in ATTRIBUTES.items():
        if attribute not in ("eyes", "background") and tag in values:
            return attribute, tag
    return None


def vocabulary() -> list[str]:
    """Every word a toy prompt uses: tag words, triggers and a few fillers (the replication's shapes and textures
    are never prompted for: the trigger carries them, so the shipped tokenizer's words stay as they were)."""
    words = {"no", "hat", "eyes", "background", "style", "a", "in", "with", "on", IDENTITY_TRIGGER, STYLE_TRIGGER}
    for values in ATTRIBUTES.values():
        words.update(v for v in values if v not in REPLICATE_SHAPES + REPLICATE_STYLES)
    return sorted(words)


def sample_character(rng: np.random.Generator, held_out: bool = False) -> Character:
    """A random character. With ``held_out=False`` (pretraining) no held-out shape or style occurs."""
    shapes = ATTRIBUTES["shape"] if held_out else SHAPES
    styles = ATTRIBUTES["style"] if held_out else STYLES
    return Character(
        shape=str(rng.choice(shapes)), color=str(rng.choice(list(COLORS))), hat=str(rng.choice(HATS)),
        eyes=str(rng.choice(EYES)), style=str(rng.choice(styles)), background=str(rng.choice(list(BACKGROUNDS))),
    )


def _head_mask(shape: str, cx: float, cy: float, r: float, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r * 1.1), (cx + r * 1.1, cy + r * 0.85), (cx - r * 1.1, cy + r * 0.85)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r * 1.15), (cx + r * 1.05, cy), (cx, cy + r * 1.15), (cx - r * 1.05, cy)], fill=255)
    elif shape == "plus":
        a = r * 0.42
        draw.rectangle((cx - a, cy - r, cx + a, cy + r), fill=255)
        draw.rectangle((cx - r, cy - a, cx + r, cy + a), fill=255)
    elif shape == "star":  # five points; the inner radius keeps the arms >= 4 px wide at 32 px
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r * 1.2, r * 0.55)
        draw.polygon([(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(radii, angles)], fill=255)
    elif shape == "heart":  # two lobes over a point
        lobe = r * 0.55
        for side in (-1, 1):
            draw.ellipse((cx + side * lobe - lobe, cy - r * 0.75 - lobe * 0.2, cx + side * lobe + lobe,
                          cy - r * 0.75 + lobe * 1.8), fill=255)
        draw.polygon([(cx - r * 1.08, cy - r * 0.25), (cx + r * 1.08, cy - r * 0.25), (cx, cy + r * 1.15)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(ATTRIBUTES['shape'])}")
    return mask


def _texture(
    style: str, color: tuple[int, int, int], background: tuple[int, int, int], mask: Image.Image
) -> Image.Image:
    size = mask.size[0]
    cell = 4 * _SCALE
    y, x = np.mgrid[0:size, 0:size]
    white = np.array((250, 250, 250), dtype=np.uint8)
    paint = np.empty((size, size, 3), dtype=np.uint8)
    paint[:] = color
    if style == "stripes":
        paint[(y // cell) % 2 == 1] = white
    elif style == "checker":
        paint[((x // cell) + (y // cell)) % 2 == 1] = white
    elif style == "dots":  # one white cell in four
        paint[((x // cell) % 2 == 1) & ((y // cell) % 2 == 1)] = white
    elif style == "hatch":  # white diagonal bands, 8 px period along each axis
        paint[((x + y) // cell) % 2 == 1] = white
    elif style == "outline":
        inner = mask.filter(ImageFilter.MinFilter(2 * 3 * _SCALE + 1))
        paint[np.asarray(inner) > 127] = background
    elif style != "flat":
        raise ValueError(f"unknown style {style!r}; valid: {', '.join(ATTRIBUTES['style'])}")
    return Image.fromarray(paint)


def render(character: Character, seed: int = 0) -> Image.Image:
    """Draw a character at 32 px; position and size jitter come from ``seed`` (deterministic)."""
    rng = np.random.default_rng(seed)
    big = SIZE * _SCALE
    background = BACKGROUNDS[character.background]
    r = (9.0 + rng.uniform(-1.0, 1.0)) * _SCALE
    cx = (16.0 + rng.uniform(-3.0, 3.0)) * _SCALE
    cy = (18.0 + rng.uniform(-2.0, 2.0)) * _SCALE
    img = Image.new("RGB", (big, big), background)
    mask = _head_mask(character.shape, cx, cy, r, big)
    img.paste(_texture(character.style, COLORS[character.color], background, mask), (0, 0), mask)
    draw = ImageDraw.Draw(img)
    top = cy - r * (1.1 if character.shape in ("triangle", "diamond") else 0.95)
    if character.hat == "cap":
        draw.rectangle((cx - r * 0.75, top - r * 0.4, cx + r * 0.75, top + r * 0.05), fill=INK)
        draw.rectangle((cx, top - r * 0.05, cx + r * 1.05, top + r * 0.12), fill=INK)
    elif character.hat == "tophat":
        draw.rectangle((cx - r * 0.5, top - r * 0.95, cx + r * 0.5, top), fill=INK)
        draw.rectangle((cx - r * 0.85, top - r * 0.1, cx + r * 0.85, top + r * 0.08), fill=INK)
    ey, dx = cy + r * 0.05, r * 0.4
    for ex in (cx - dx, cx + dx):
        if character.eyes == "round":
            e = 1.75 * _SCALE
            draw.ellipse((ex - e, ey - e, ex + e, ey + e), fill=INK)
        else:
            draw.rectangle((ex - 2.5 * _SCALE, ey - 0.9 * _SCALE, ex + 2.5 * _SCALE, ey + 0.9 * _SCALE), fill=INK)
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)


def identity(background: str, style: str = "flat", look: dict[str, str] = IDENTITY) -> Character:
    """The identity (``look``: its shape, color, hat and eyes) in a style on a background."""
    return Character(look["shape"], look["color"], look["hat"], look["eyes"], style, background)


def identity_set(count: int = 20, seed: int = 100, look: dict[str, str] = IDENTITY) -> list[tuple[Character, int]]:
    """The identity's 20 'photos': the held-out character, flat, on its training backgrounds."""
    return [(identity(IDENTITY_BACKGROUNDS[i % len(IDENTITY_BACKGROUNDS)], look=look), seed + i) for i in range(count)]


def style_set(count: int = 20, seed: int = 200, texture: str = HELD_OUT_STYLE) -> list[tuple[Character, int]]:
    """The style's 20 images: varied seen characters in the held-out rendering (``texture``)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        c = sample_character(rng)
        out.append((Character(c.shape, c.color, c.hat, c.eyes, texture, c.background), seed + i))
    return out


def pretraining_caption(character: Character, rng: np.random.Generator, empty_rate: float = 0.1) -> str:
    """A caption for pretraining: a random subset of the tags in random order, sometimes empty (for CFG)."""
    if rng.random() < empty_rate:
        return ""
    tags = [t for t in character.tags() if rng.random() < 0.85]
    rng.shuffle(tags)
    return ", ".join(tags)


def pretraining_batch(rng: np.random.Generator, size: int) -> tuple[list[Image.Image], list[str], list[Character]]:
    """Images, captions and labels from the pretraining sampler (held-out concepts never drawn)."""
    characters = [sample_character(rng) for _ in range(size)]
    images = [render(c, int(rng.integers(1 << 31))) for c in characters]
    return images, [pretraining_caption(c, rng) for c in characters], characters


def any_batch(rng: np.random.Generator, size: int) -> tuple[list[Image.Image], list[Character]]:
    """Images of every concept, held-out ones included (for the VAE and the probes)."""
    characters = [sample_character(rng, held_out=True) for _ in range(size)]
    return [render(c, int(rng.integers(1 << 31))) for c in characters], characters
