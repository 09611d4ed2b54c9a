"""The README and the book quote measured numbers only from the files that measured them.

A page's tables are included from the files the study and the benchmarks write (``{include}``), never retyped. Where
its prose quotes a measured number (one with a decimal point: an effect, a CI, a time, a rate), that number must
appear, as written, in one of the page's sources: the files it includes, and those it names in a comment
``<!-- numbers from: path ... -->``. A number retyped wrong, or left behind when its table changed, fails here.
Settings (a threshold, a default) are written as code, and code is not prose.
"""

import csv
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
HEADLINE = ROOT / "figures" / "replicate" / "headline.md"

NUMBERS_FROM = re.compile(r"<!--\s*numbers from:(.*?)-->", re.S)
INCLUDE = re.compile(r"```\{(?:include|literalinclude)\}\s+(\S+)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
# Not a version (2.13.0), not in a word; a ratio's "x" (1.89x) is not a word.
DECIMAL = re.compile(r"(?<![\w.])[-+−]?\d[\d,]*\.\d+(?!(?!x\b)\w|\.\d)")
# Names and settings that look like measurements: the arXiv id, the Python floor, a speed target, SD 1.4, CC BY 4.0.
NOT_MEASURED = {"2403.07500", "3.10", "1.5", "1.4", "4.0"}


def pages() -> list[Path]:
    built = {DOCS / "_build", DOCS / "study" / "notebooks"}
    found = [p for p in DOCS.rglob("*.md") if not any(b in p.parents for b in built)]
    return [README, *sorted(found)]


def prose(text: str) -> str:
    """The text a reader reads as prose: without code (fenced or inline), comments, link targets and directives."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", " ", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def number(token: str) -> str:
    """A number as compared: no sign, no thousands separator."""
    return token.replace("−", "-").lstrip("+-").replace(",", "")


def sources(page: Path) -> list[Path]:
    text = page.read_text()
    named = [name for block in NUMBERS_FROM.findall(text) for name in block.split()]
    return [(page.parent / name).resolve() if not name.startswith("/") else Path(name)
            for name in [*INCLUDE.findall(text), *named]]


def source_numbers(files: list[Path]) -> set[str]:
    return {number(t) for f in files for t in DECIMAL.findall(f.read_text())}


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_number_the_prose_quotes_is_in_its_sources(page):
    files = sources(page)
    missing_files = [str(f) for f in files if not f.is_file()]
    assert not missing_files, f"{page.name} names sources that do not exist: {missing_files}"
    known = source_numbers(files)
    quoted = [t for t in DECIMAL.findall(prose(page.read_text())) if number(t) not in NOT_MEASURED]
    unsupported = sorted({t for t in quoted if number(t) not in known})
    assert not unsupported, (f"{page.relative_to(ROOT)} quotes numbers found in none of its sources "
                             f"({[str(f.relative_to(ROOT)) for f in files]}): {unsupported}")


def test_the_checker_catches_a_retyped_number(tmp_path):
    table = tmp_path / "table.md"
    table.write_text("| a | b |\n|---|---|\n| x | -0.34 [-0.46, -0.21] |\n")
    page = tmp_path / "page.md"
    page.write_text("<!-- numbers from: table.md -->\nThe style falls by −0.34 [−0.46, −0.21].\n")
    assert {number(t) for t in DECIMAL.findall(prose(page.read_text()))} <= source_numbers(sources(page))
    page.write_text("<!-- numbers from: table.md -->\nThe style falls by −0.43.\n")
    assert number(DECIMAL.findall(prose(page.read_text()))[0]) not in source_numbers(sources(page))
    assert DECIMAL.findall(prose("torch 2.13.0, `0.5`, [a](x/1.5.png)")) == []
    assert DECIMAL.findall("1.89x the time, 2.5xl") == ["1.89"]


def test_the_readme_headline_table_is_the_replicated_studys():
    """The README's findings table is ``figures/replicate/headline.md``, row for row (written by ``python -m bwl
    replicate`` from ``figures/replicate.csv``)."""
    from bwl.study.scoring.headline import headline

    with open(ROOT / "figures" / "replicate.csv", newline="") as f:
        assert headline(list(csv.DictReader(f))) == HEADLINE.read_text()  # the committed table is the CSV's
    table = [line for line in HEADLINE.read_text().splitlines() if line.startswith("|")]
    readme = README.read_text().splitlines()
    start = readme.index(table[0])
    assert readme[start:start + len(table)] == table


def test_the_readme_is_short_and_holds_no_ci_history():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert "on a fresh clone of" not in text


def test_every_image_the_pages_show_exists():
    missing = [(str(p.relative_to(ROOT)), link) for p in pages() for link in IMAGE.findall(p.read_text())
               if not link.startswith("http") and not (p.parent / link).is_file()]
    assert not missing, missing


def test_the_assets_table_is_the_assets_records():
    from bwl.toy.records import assets_markdown

    assert (ROOT / "figures" / "assets.md").read_text() == assets_markdown()


def test_the_block_maps_are_the_vocabulary():
    from bwl.adapters.architectures import block_maps_markdown

    assert (ROOT / "figures" / "block-maps.md").read_text() == block_maps_markdown()


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_committed_notebook_holds_papermills_injected_cell(path):
    from bwl.study.running.notebook_files import injected_cells

    assert injected_cells(json.loads(path.read_text())) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_colab_cell_clones_the_repository_named_in_pyproject(path):
    import tomllib

    from bwl.study.running.notebook_files import colab_cell_index, colab_source

    repository = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    notebook = json.loads(path.read_text())
    assert "".join(notebook["cells"][colab_cell_index(notebook)]["source"]) == colab_source(repository)


def test_sync_writes_the_address_and_drops_the_injected_cell(tmp_path):
    from bwl.study.running.notebook_files import (
        colab_cell_index,
        colab_source,
        drop_injected_parameters,
        sync_colab_cells,
    )

    notebook = json.loads(NOTEBOOKS[0].read_text())
    notebook["cells"].insert(3, {"cell_type": "code", "execution_count": 1, "id": "x", "outputs": [],
                                 "metadata": {"tags": ["injected-parameters"]}, "source": ["# Parameters\n"]})
    (tmp_path / "a.ipynb").write_text(json.dumps(notebook))
    assert sync_colab_cells(tmp_path, "https://example.org/fork") == [tmp_path / "a.ipynb"]
    assert drop_injected_parameters(tmp_path) == [tmp_path / "a.ipynb"]
    written = json.loads((tmp_path / "a.ipynb").read_text())
    assert len(written["cells"]) == len(notebook["cells"]) - 1
    assert "".join(written["cells"][colab_cell_index(written)]["source"]) == colab_source("https://example.org/fork")


def test_the_tracked_tree_fits_a_gpu_checks_transfer():
    """A device check sends the whole working tree (64 MiB at most, with the wheels it carries): the tracked files
    stay under 48 MiB."""
    import subprocess

    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the tracked tree is measured on a clone")
    files = [ROOT / name for name in listed.stdout.decode().split("\0") if name]
    total = sum(f.stat().st_size for f in files if f.is_file())
    largest = sorted(files, key=lambda f: f.stat().st_size if f.is_file() else 0)[-3:]
    assert total < 48 * 2**20, f"tracked files: {total / 2**20:.1f} MiB; largest: {[str(f) for f in largest]}"


def test_figures_are_palette_pngs_that_look_like_the_render(tmp_path):
    """Plots are written with at most 256 colours (a third of the bytes) and stay within a grey level of the render."""
    import io

    import numpy as np
    from matplotlib.figure import Figure
    from PIL import Image

    from bwl.core.atomic import finish_figure

    figure = Figure(figsize=(4, 3))
    axes = figure.subplots()
    for k in range(6):
        axes.errorbar(np.arange(5), np.sin(np.arange(5) + k), yerr=0.2, label=f"line {k}")
    axes.legend()
    axes.set_title("a forest plot's kind of figure")
    finish_figure(figure, tmp_path / "plot.png")
    rendered = io.BytesIO()
    figure.savefig(rendered, format="png", dpi=110)
    written = Image.open(tmp_path / "plot.png")
    assert written.mode == "P" and (tmp_path / "plot.png").stat().st_size < len(rendered.getvalue())
    difference = np.abs(np.asarray(written.convert("RGB"), float) - np.asarray(Image.open(rendered).convert("RGB")))
    assert difference.mean() < 1.0
