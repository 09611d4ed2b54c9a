"""Manual tag correction: an ipywidgets thumbnail grid with each image's caption editable, tags added or removed
across all images, and a save button. Headless (papermill, CI) it shows the captions as a table instead."""

from __future__ import annotations

import html
import io
from pathlib import Path

import ipywidgets as widgets
from IPython.display import Markdown, display
from PIL import Image

from bwl.core.atomic import write_text
from bwl.data.datasets import open_rgb, scan_images, split_tags


class CaptionEditor:
    """Edit the ``.txt`` captions of one image folder. The text boxes are the source of truth until ``save``."""

    def __init__(self, folder: str | Path, thumbnail: int = 96, columns: int = 4):
        self.folder = Path(folder)
        self.images, _ = scan_images(self.folder)
        self.boxes: dict[Path, widgets.Textarea] = {}
        cards = []
        for path in self.images:
            txt = path.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8").strip() if txt.exists() else ""
            box = widgets.Textarea(value=caption, layout=widgets.Layout(width=f"{thumbnail * 2}px", height="60px"))
            self.boxes[path] = box
            thumb = open_rgb(path)
            thumb.thumbnail((thumbnail, thumbnail), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            thumb.save(buffer, format="PNG")
            cards.append(
                widgets.VBox([widgets.Image(value=buffer.getvalue(), format="png"), widgets.Label(path.name), box])
            )
        self.tag_input = widgets.Text(placeholder="tag")
        self.add_button = widgets.Button(description="add to all")
        self.remove_button = widgets.Button(description="remove from all")
        self.save_button = widgets.Button(description="save captions", button_style="primary")
        self.status = widgets.HTML()
        self.add_button.on_click(lambda _: self.add_tag(self.tag_input.value))
        self.remove_button.on_click(lambda _: self.remove_tag(self.tag_input.value))
        self.save_button.on_click(lambda _: self.save())
        grid = widgets.GridBox(cards, layout=widgets.Layout(grid_template_columns=f"repeat({columns}, auto)"))
        self.widget = widgets.VBox(
            [widgets.HBox([self.tag_input, self.add_button, self.remove_button, self.save_button]), self.status, grid]
        )

    def captions(self) -> dict[Path, str]:
        return {path: box.value.strip() for path, box in self.boxes.items()}

    def add_tag(self, tag: str) -> int:
        """Append ``tag`` to every caption lacking it; returns how many changed."""
        tag = tag.strip()
        changed = 0
        for box in self.boxes.values():
            tags = split_tags(box.value)
            if tag and tag.lower() not in (t.lower() for t in tags):
                box.value = ", ".join(tags + [tag])
                changed += 1
        self.status.value = f"added {html.escape(tag)!s} to {changed} captions (not saved yet)"
        return changed

    def remove_tag(self, tag: str) -> int:
        """Remove ``tag`` from every caption; returns how many changed."""
        tag = tag.strip().lower()
        changed = 0
        for box in self.boxes.values():
            tags = split_tags(box.value)
            kept = [t for t in tags if t.lower() != tag]
            if len(kept) != len(tags):
                box.value = ", ".join(kept)
                changed += 1
        self.status.value = f"removed {html.escape(tag)} from {changed} captions (not saved yet)"
        return changed

    def save(self) -> int:
        """Write every caption whose file differs; returns how many files were written."""
        written = 0
        for path, caption in self.captions().items():
            txt = path.with_suffix(".txt")
            if not txt.exists() or txt.read_text(encoding="utf-8").strip() != caption:
                write_text(txt, caption + "\n")
                written += 1
        self.status.value = f"saved {written} caption files"
        return written

    def table(self) -> str:
        """The captions as a markdown table."""
        rows = [f"| {p.name} | {c} |" for p, c in self.captions().items()]
        return "\n".join(["| image | caption |", "|---|---|", *rows])

    def show(self, interactive: bool = True) -> None:
        """The editor in JupyterLab/Colab; a caption table when ``interactive`` is False (papermill, CI)."""
        display(self.widget if interactive else Markdown(self.table()))
