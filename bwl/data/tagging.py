"""Auto-tagging for captions: WD14 ONNX taggers (DeepDanbooru's successor), or none.

A tagger maps images to ``{tag: confidence}``. WD14 preprocessing is SmilingWolf's: pad to a white square,
resize to the model's input size, RGB -> BGR, float32 NHWC in 0..255. Rating tags (category 9) are dropped;
general (0) and character (4) tags have separate thresholds.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

RATING, GENERAL, CHARACTER = 9, 0, 4


class Tagger(Protocol):
    def __call__(self, images: Sequence[Image.Image]) -> list[dict[str, float]]: ...


class TaggerError(RuntimeError):
    """A tagger that cannot be loaded or run."""


def wd14_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """One image as WD14 input: white-padded square, ``size`` px, BGR, float32 HWC in 0..255."""
    image = image.convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(canvas, image).convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
    square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


class WD14Tagger:
    """A SmilingWolf WD14 tagger (``model.onnx`` + ``selected_tags.csv``) from a local folder or a hub id."""

    def __init__(self, model: str | Path, general_threshold: float = 0.35, character_threshold: float = 0.85,
                 underscores_to_spaces: bool = True):
        try:
            import onnxruntime
        except ImportError as err:
            raise TaggerError(
                "the wd14 tagger needs onnxruntime: pip install 'bwl[tagger]' (or pip install onnxruntime)"
            ) from err
        folder = Path(model)
        if not folder.is_dir():
            from huggingface_hub import hf_hub_download

            try:
                folder = Path(hf_hub_download(str(model), "model.onnx")).parent
                hf_hub_download(str(model), "selected_tags.csv")
            except Exception as err:
                raise TaggerError(
                    f"cannot get WD14 tagger {model!r}: not a local folder and not downloadable ({err})"
                ) from err
        for name in ("model.onnx", "selected_tags.csv"):
            if not (folder / name).is_file():
                raise TaggerError(
                    f"{folder}: missing {name} (a WD14 tagger folder holds model.onnx and selected_tags.csv)"
                )
        self.session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.size = int(self.input.shape[1])
        with open(folder / "selected_tags.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        self.names = [
            r["name"].replace("_", " ") if underscores_to_spaces and len(r["name"]) > 3 else r["name"] for r in rows
        ]
        self.categories = [int(r["category"]) for r in rows]
        self.general_threshold, self.character_threshold = general_threshold, character_threshold

    def __call__(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        out = []
        for image in images:
            batch = wd14_preprocess(image, self.size)[None]
            probs = self.session.run(None, {self.input.name: batch})[0][0]
            tags: dict[str, float] = {}
            for name, category, p in zip(self.names, self.categories, probs):
                if category == CHARACTER and p >= self.character_threshold:
                    tags[name] = float(p)
            general = [(name, float(p)) for name, category, p in zip(self.names, self.categories, probs)
                       if category == GENERAL and p >= self.general_threshold]
            tags.update(sorted(general, key=lambda item: -item[1]))
            out.append(tags)
        return out


class NoTagger:
    """No tags: captions are the trigger (and class word) only."""

    def __call__(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        return [{} for _ in images]


TAGGERS = ("wd14", "none")  # the toy world adds its probe as a tagger (bwl.toy.tagger)


def make_tagger(name: str, model: str | Path | None = None, **options) -> Tagger:
    """``wd14`` (model: folder or hub id) or ``none``."""
    if name == "wd14":
        return WD14Tagger(model or "SmilingWolf/wd-v1-4-moat-tagger-v2", **options)
    if name == "none":
        return NoTagger()
    raise TaggerError(f"unknown tagger {name!r}; valid: {', '.join(TAGGERS)}")
