"""Data prep: kohya-layout datasets loaded robustly, auto-tagging (WD14), tag captions with manual correction, the
caption editor, and regularization images. Above :mod:`bwl.core` and :mod:`bwl.sd`."""

from bwl.data.captions import compose_caption, tag_frequency, write_captions
from bwl.data.datasets import (
                               DatasetError,
                               Example,
                               Skipped,
                               load_image,
                               load_images,
                               open_rgb,
                               prepare_folder,
                               scan_dataset,
                               split_tags,
)
from bwl.data.tagging import Tagger, TaggerError, WD14Tagger, make_tagger

__all__ = [
    "DatasetError", "Example", "Skipped", "Tagger", "TaggerError", "WD14Tagger", "compose_caption", "load_image",
    "load_images", "make_tagger", "open_rgb", "prepare_folder", "scan_dataset", "split_tags", "tag_frequency",
    "write_captions",
]
