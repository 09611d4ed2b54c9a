"""Training data in kohya's layout: images with same-name ``.txt`` tag captions, ``N_name`` repeat folders.

Images are loaded robustly (EXIF rotation; CMYK, 16-bit, palette, alpha converted to RGB; PIL's
decompression-bomb guard enforced), resized on the short side and cropped to a square.
"""

from __future__ import annotations

import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from bwl.core.atomic import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """A dataset folder bwl cannot train on."""


@dataclass(frozen=True)
class Example:
    """One training image with its caption, repeat count and role."""

    image: Path
    caption: str
    repeats: int
    is_reg: bool = False


@dataclass(frozen=True)
class Skipped:
    """A file that was not used, and why."""

    path: Path
    reason: str


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB: EXIF rotation applied, alpha composited on white, 16-bit scaled down.

    Raises ``DatasetError`` naming the file for unreadable, truncated or oversized (decompression bomb) images.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DatasetError(f"{path}: refused as a possible decompression bomb ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable image ({err})") from err
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        img = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def crop_square(
    img: Image.Image, resolution: int, random_crop: bool = False, rng: random.Random | None = None
) -> Image.Image:
    """Resize the short side to ``resolution`` and crop a ``resolution`` square (center, or random)."""
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    img = img.resize(size, Image.Resampling.LANCZOS)
    dx, dy = size[0] - resolution, size[1] - resolution
    if random_crop:
        rng = rng or random.Random(0)
        left, top = rng.randint(0, dx), rng.randint(0, dy)
    else:
        left, top = dx // 2, dy // 2
    return img.crop((left, top, left + resolution, top + resolution))


def load_image(path: str | Path, resolution: int) -> Image.Image:
    """Open, convert to RGB and center-crop an image to ``resolution`` (upscaling small ones)."""
    return crop_square(open_rgb(path), resolution)


def load_images(paths: list[Path], resolution: int) -> list[Image.Image]:
    """:func:`load_image` for many files; one warning lists those smaller than ``resolution``."""
    images, small = [], []
    for path in paths:
        img = open_rgb(path)
        if min(img.size) < resolution:
            small.append(f"{path.name} ({img.size[0]}x{img.size[1]})")
        images.append(crop_square(img, resolution))
    if small:
        shown = ", ".join(small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        warnings.warn(
            f"{len(small)} image(s) smaller than the training resolution {resolution} are upscaled: {shown}",
            stacklevel=2,
        )
    return images


def split_tags(caption: str) -> list[str]:
    """Split a kohya tag caption ``"trigger, tag1, tag2"`` into stripped, non-empty tags."""
    return [t.strip() for t in caption.replace("\n", ",").split(",") if t.strip()]


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """kohya ``shuffle_caption``: shuffle the tags after the first ``keep_tokens``."""
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def read_caption(image: Path) -> str | None:
    """The image's same-name ``.txt`` caption, or None where there is none (or it is empty)."""
    txt = image.with_suffix(".txt")
    if txt.is_file():
        caption = txt.read_text(encoding="utf-8", errors="replace").strip()
        if caption:
            return caption
    return None


def _captioned(images: list[Path], fallback: str) -> tuple[list[str], list[Path]]:
    """Each image's caption (``fallback`` where it has none), and the images that had none."""
    captions = [read_caption(image) for image in images]
    return [c if c is not None else fallback for c in captions], [i for i, c in zip(images, captions) if c is None]


def scan_images(folder: Path) -> tuple[list[Path], list[Skipped]]:
    """Image files directly in ``folder`` (sorted), and the other files that were skipped."""
    images, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.is_dir() or path.suffix.lower() == ".txt" or path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(Skipped(path, "not an image file"))
        elif path.stat().st_size == 0:
            skipped.append(Skipped(path, "empty file"))
        else:
            try:  # decode, not just verify(): verify() passes a truncated JPEG that then fails to load
                with Image.open(path) as img:
                    img.load()
                images.append(path)
            except Exception as err:  # PIL raises many types for corrupt files
                skipped.append(Skipped(path, f"unreadable image ({type(err).__name__})"))
    return images, skipped


def scan_dataset(
    folder: str | Path, repeats: int = 1, fallback_caption: str = "", is_reg: bool = False
) -> tuple[list[Example], list[Skipped]]:
    """Examples of a kohya-style folder: images directly inside (``repeats`` each) and ``N_name`` subfolders (N each).

    Non-image, empty and corrupt files are skipped and returned; an empty dataset is an error naming the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: dataset folder does not exist")
    if not isinstance(repeats, int) or repeats < 1:
        raise DatasetError(f"repeats must be a positive integer, got {repeats!r}")
    examples: list[Example] = []
    skipped: list[Skipped] = []
    sources = [(folder, repeats)]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = _REPEAT_DIR.match(sub.name)
        if m:
            sources.append((sub, int(m.group(1))))
        elif not sub.name.startswith("."):
            skipped.append(Skipped(sub, "subfolder not named N_name (kohya repeats convention)"))
    uncaptioned: list[Path] = []
    for source, n in sources:
        images, bad = scan_images(source)
        skipped += bad
        captions, missing = _captioned(images, fallback_caption)
        uncaptioned += missing
        examples += [Example(image, caption, n, is_reg) for image, caption in zip(images, captions)]
    if not examples:
        raise DatasetError(f"{folder}: no usable images (skipped {len(skipped)} files)")
    if uncaptioned:
        names = ", ".join(p.name for p in uncaptioned[:3]) + (", …" if len(uncaptioned) > 3 else "")
        warnings.warn(f"{folder}: {len(uncaptioned)} image(s) have no caption file ({names}); using "
                      f"{fallback_caption!r}", stacklevel=2)
    return examples, skipped


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare_folder` did with one source file."""

    source: Path
    target: Path | None
    note: str


def prepare_folder(source: str | Path, target: str | Path, resolution: int | None = None, min_size: int = 64,
                   repeats: int | None = None, name: str = "") -> list[Prepared]:
    """Copy (or, with ``resolution``, shrink the short side to it) the images of ``source`` into a training folder.

    With ``repeats`` the folder is ``target/<repeats>_<name>`` (kohya's convention). Captions travel with their
    images. The originals are never modified. Non-images, unreadable and too-small images are reported, not raised.
    """
    source, target = Path(source), Path(target)
    if repeats is not None:
        target = target / f"{repeats}_{name or source.name}"
    target.mkdir(parents=True, exist_ok=True)
    images, skipped = scan_images(source)
    report = [Prepared(s.path, None, f"skipped: {s.reason}") for s in skipped]
    for path in images:
        try:
            img = open_rgb(path)
        except DatasetError as err:
            report.append(Prepared(path, None, f"skipped: {err}"))
            continue
        if min(img.size) < min_size:
            report.append(Prepared(path, None, f"skipped: {img.size[0]}x{img.size[1]} is smaller than {min_size} px"))
            continue
        if resolution and min(img.size) > resolution:
            scale = resolution / min(img.size)
            img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.LANCZOS)
            out = target / f"{path.stem}.png"
            with atomic_path(out) as tmp:
                img.save(tmp, format="PNG")
            note = f"resized to {img.size[0]}x{img.size[1]}"
        else:
            out = target / path.name
            with atomic_path(out) as tmp:
                shutil.copyfile(path, tmp)
            note = "copied"
        caption = path.with_suffix(".txt")
        if caption.exists():
            with atomic_path(out.with_suffix(".txt")) as tmp:
                shutil.copyfile(caption, tmp)
        report.append(Prepared(path, out, note))
    return report


def report_table(rows: list[Prepared]) -> str:
    """A markdown table of a preparation report."""
    lines = ["| file | result |", "|---|---|"]
    lines += [f"| {r.source.name} | {r.note} |" for r in rows]
    return "\n".join(lines)
