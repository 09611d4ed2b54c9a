"""Content hashes: what a run, a cell or a dataset is keyed by, so that changed inputs never reuse old outputs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def config_hash(values: Any) -> str:
    """A short, stable hash of JSON-able values (keys sorted; other objects by their ``str``)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def file_hash(path: str | Path) -> str:
    """A hash of one file's bytes (an adapter file in a grid cell's key)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def fingerprint(folder: str | Path) -> str:
    """A hash of a folder's files (names and bytes), so changed captions, images or weights mean a new run. A linked
    folder inside it (``data/toy-sdxl/vae``, the SD toy's VAE) counts with its files, as if copied there."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = (Path(root) / name for root, _, names in os.walk(folder, followlinks=True) for name in names)
    for path in sorted(p for p in files if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
