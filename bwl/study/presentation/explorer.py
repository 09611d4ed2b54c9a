"""The interactive block explorer: one slider per paper block for each of two adapters, regenerating a fixed seed."""

from __future__ import annotations

import io
from pathlib import Path

import ipywidgets as widgets

from bwl.adapters.compose import load_adapters, set_block_weights
from bwl.adapters.spec import unet_architecture
from bwl.sd.generate import generate
from bwl.sd.pipeline import load_pipeline


class BlockExplorer:
    """Sliders for every block of each adapter; each change re-renders ``prompt`` at ``seed``."""

    def __init__(self, model: str | Path, adapters: dict[str, str | Path], prompt: str, seed: int = 0,
                 steps: int = 25, size: int | None = None, scale: int = 4):
        self.pipe = load_pipeline(model)
        load_adapters(self.pipe, adapters)
        self.prompt, self.seed, self.steps, self.size, self.scale = prompt, seed, steps, size, scale
        self.sliders = {
            name: {b: widgets.FloatSlider(value=1.0, min=0.0, max=1.5, step=0.1, description=b, continuous_update=False)
                   for b in unet_architecture(self.pipe.unet).paper_blocks}
            for name in adapters
        }
        self.image = widgets.Image(format="png")
        for blocks in self.sliders.values():
            for slider in blocks.values():
                slider.observe(lambda _: self.update(), names="value")
        columns = [
            widgets.VBox([widgets.HTML(f"<b>{name}</b>"), *blocks.values()]) for name, blocks in self.sliders.items()
        ]
        self.widget = widgets.HBox([*columns, self.image])

    def weights(self) -> dict[str, dict[str, float]]:
        return {name: {b: s.value for b, s in blocks.items()} for name, blocks in self.sliders.items()}

    def render(self):
        set_block_weights(self.pipe, self.weights())
        image = generate(self.pipe, [self.prompt], [self.seed], self.steps, size=self.size)[0]
        return image.resize((image.width * self.scale, image.height * self.scale))

    def update(self) -> None:
        buffer = io.BytesIO()
        self.render().save(buffer, format="PNG")
        self.image.value = buffer.getvalue()

    def show(self) -> None:
        from IPython.display import display

        self.update()
        display(self.widget)
