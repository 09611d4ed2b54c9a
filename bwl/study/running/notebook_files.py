"""The committed notebook files: their Colab cell, and no papermill injected-parameters cell.

Each study notebook's first code cell, on Colab, fetches the repository and installs bwl (torch is already there).

The repository's address is written in one place, ``pyproject.toml``'s ``[project.urls] Repository`` (read back
from the installed package's metadata); :func:`sync_colab_cells` writes it into every notebook (``make notebooks``),
and a test checks that they agree. ``BWL_REPOSITORY`` overrides it on Colab, for a fork.
"""

from __future__ import annotations

import json
from importlib.metadata import metadata
from pathlib import Path

from bwl.core.atomic import write_text
from bwl.study.design.profile import ROOT

MARKER = 'if "google.colab" in sys.modules:'


def repository_url() -> str:
    """The repository's address from the package metadata (``[project.urls] Repository``)."""
    urls = dict(entry.split(", ", 1) for entry in metadata("bwl").get_all("Project-URL") or [])
    return urls["Repository"]


def colab_source(repository: str) -> str:
    """The Colab cell: clone ``repository`` (or ``$BWL_REPOSITORY``), install bwl, and work from its notebooks."""
    return f"""import os
import subprocess
import sys

{MARKER}  # on Colab: clone the repository (for data/) and install bwl; torch is kept
    _repository = os.environ.get("BWL_REPOSITORY", "{repository}")
    subprocess.run(["git", "clone", "-q", "--depth", "1", _repository, "/content/bwl"], check=False)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/bwl"], check=True)
    sys.path.insert(0, "/content/bwl")  # an editable install is seen by new processes; this kernel is not one
    os.chdir("/content/bwl/notebooks")"""


def colab_cell_index(notebook: dict) -> int:
    """The index of the notebook's Colab cell (the code cell holding :data:`MARKER`)."""
    found = [i for i, cell in enumerate(notebook["cells"])
             if cell["cell_type"] == "code" and MARKER in "".join(cell["source"])]
    if len(found) != 1:
        raise ValueError(f"expected one Colab cell, found {len(found)}")
    return found[0]


def _write(path: Path, notebook: dict) -> None:
    write_text(path, json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")


def injected_cells(notebook: dict) -> list[int]:
    """Indices of papermill's injected-parameters cells (a notebook papermill ran has one)."""
    return [i for i, cell in enumerate(notebook["cells"])
            if "injected-parameters" in cell.get("metadata", {}).get("tags", [])]


def drop_injected_parameters(folder: Path = ROOT / "notebooks") -> list[Path]:
    """Remove papermill's injected-parameters cell from every notebook in ``folder``; returns those changed."""
    changed = []
    for path in sorted(folder.glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        injected = injected_cells(notebook)
        if injected:
            notebook["cells"] = [c for i, c in enumerate(notebook["cells"]) if i not in injected]
            _write(path, notebook)
            changed.append(path)
    return changed


def sync_colab_cells(folder: Path = ROOT / "notebooks", repository: str | None = None) -> list[Path]:
    """Write the Colab cell with the repository's address into every notebook in ``folder``; returns those changed."""
    source, changed = colab_source(repository or repository_url()), []
    for path in sorted(folder.glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        cell = notebook["cells"][colab_cell_index(notebook)]
        if "".join(cell["source"]) != source:
            cell["source"] = source.splitlines(keepends=True)
            _write(path, notebook)
            changed.append(path)
    return changed
