"""Captions in kohya's form ``<trigger>, [class word,] tag1, tag2, ...``, written beside each image."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bwl.core.atomic import write_text
from bwl.data.datasets import open_rgb, scan_images
from bwl.data.tagging import Tagger


def compose_caption(tags: Iterable[str], trigger: str, class_word: str = "", blacklist: Iterable[str] = (),
                    replace: Mapping[str, str] | None = None) -> str:
    """Trigger first, then the class word, then tags: replaced, blacklisted tags dropped, duplicates removed."""
    replace = dict(replace or {})
    banned = {b.strip().lower() for b in blacklist}
    head = [t for t in (trigger.strip(), class_word.strip()) if t]
    out: list[str] = []
    seen = {t.lower() for t in head}
    for tag in tags:
        tag = replace.get(tag.strip(), tag.strip())
        if not tag or tag.lower() in banned or tag.lower() in seen:
            continue
        seen.add(tag.lower())
        out.append(tag)
    return ", ".join(head + out)


@dataclass
class CaptionResult:
    image: Path
    caption: str
    written: bool


def write_captions(
    folder: str | Path,
    tagger: Tagger,
    trigger: str,
    class_word: str = "",
    blacklist: Iterable[str] = (),
    replace: Mapping[str, str] | None = None,
    overwrite: bool = False,
    batch_size: int = 16,
) -> list[CaptionResult]:
    """Tag every image in ``folder`` and write ``<image>.txt``; existing captions are kept unless ``overwrite``."""
    folder = Path(folder)
    images, _ = scan_images(folder)
    results: list[CaptionResult] = []
    todo = [p for p in images if overwrite or not p.with_suffix(".txt").exists()]
    for p in images:
        if p not in todo:
            results.append(CaptionResult(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip(), False))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for path, tags in zip(chunk, tagger([open_rgb(p) for p in chunk])):
            caption = compose_caption(tags, trigger, class_word, blacklist, replace)
            write_text(path.with_suffix(".txt"), caption + "\n")
            results.append(CaptionResult(path, caption, True))
    return sorted(results, key=lambda r: r.image)


def tag_frequency(folders: Iterable[str | Path]) -> dict[str, dict[str, int]]:
    """Tag counts per dataset folder exactly as kohya's ``ss_tag_frequency``: captions split on ``,``, tags stripped
    and lowercased, every occurrence counted, keyed by the folder's name."""
    frequency: dict[str, dict[str, int]] = {}
    for folder in map(Path, folders):
        counts = frequency.setdefault(folder.name, {})
        for txt in sorted(folder.glob("*.txt")):
            for tag in txt.read_text(encoding="utf-8").split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return frequency
