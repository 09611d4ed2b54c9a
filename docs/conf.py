"""The bwl book: Sphinx with MyST-NB, built offline from ``docs/`` and the committed, executed notebooks.

``make docs`` builds it into ``build/docs`` without executing anything (the notebooks show their stored outputs);
CI builds it with ``-W``, so a broken link, a missing figure or a bad reference fails. Tables are included from the
files the study and the benchmarks write (``figures/``, ``benchmarks/results/``), never retyped.
"""

import shutil
from pathlib import Path

from bwl.study.running.notebook_files import repository_url

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

project = "bwl"
author = "the bwl authors"
copyright = "2026, the bwl authors"
extensions = ["myst_nb"]
myst_enable_extensions = ["colon_fence", "dollarmath", "substitution"]
_repository = repository_url().removeprefix("https://github.com/")
_colab = f"https://colab.research.google.com/github/{_repository}/blob/main/notebooks"
myst_substitutions = {"repository": repository_url(),  # pyproject.toml's [project.urls], the notebooks' one place
                      "colab_first": f"[01 · data preparation]({_colab}/01_data_preparation.ipynb)"}
myst_heading_anchors = 4
nb_execution_mode = "off"  # the notebooks' stored outputs (from a smoke run, what nbval checks) are shown
nb_merge_streams = True
exclude_patterns = ["_build"]
suppress_warnings = ["mystnb.unknown_mime_type"]  # ipywidgets' state: the widgets need a kernel
html_theme = "sphinx_book_theme"
html_title = "bwl: block-wise LoRA, measured"
html_theme_options = {"show_toc_level": 2, "use_download_button": False, "use_fullscreen_button": False}
html_last_updated_fmt = None

# The study's notebooks live in ../notebooks (where papermill and nbval run them); the book renders copies.
notebooks = DOCS / "study" / "notebooks"
notebooks.mkdir(parents=True, exist_ok=True)
for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    target = notebooks / notebook.name
    if not target.exists() or target.read_bytes() != notebook.read_bytes():
        shutil.copyfile(notebook, target)
