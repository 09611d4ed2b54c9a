"""Atomic file writes: a file bwl writes is either complete or absent, never partial."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``.

    On any exception (or a kill) the destination keeps its previous content and the temporary file is removed
    (a kill can leave a ``.tmp`` file, never a partial destination). An operating-system error (a full disk) that
    names no file is raised again naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise naming(error, path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, path)
    except OSError as error:
        raise naming(error, path) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def naming(error: OSError, path: str | Path) -> OSError:
    """``error`` itself if it names a file; else the same error (same type and errno) naming ``path``. A write that
    fails for want of space names no file (the write call knows only a descriptor)."""
    if error.filename is not None or error.errno is None:
        return error
    return type(error)(error.errno, error.strerror or os.strerror(error.errno), str(path))


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: object) -> Path:
    """Write JSON atomically, pretty-printed and key-sorted so configs diff cleanly."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """``rows`` (dicts with the same keys, the first row's order) as a CSV file, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def palette_png(image: Image.Image) -> bytes:
    """``image`` as a PNG of at most 256 colours: a plot or a toy image has far fewer distinct colours than pixels, so
    it looks the same at about a third of the bytes, which keeps the committed figures small."""
    buffer = io.BytesIO()
    image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def finish_figure(figure, path: str | Path | None = None):
    """Lay out a matplotlib figure and, when ``path`` is given, write it there as a palette PNG (:func:`palette_png`)
    at 110 dpi, atomically; returns the figure."""
    figure.tight_layout()
    if path is not None:
        rendered = io.BytesIO()
        figure.savefig(rendered, format="png", dpi=110)
        with atomic_path(path) as tmp:
            tmp.write_bytes(palette_png(Image.open(rendered)))
    return figure
