"""What each block does, in the toy world where every attribute is known: where the U-Net represents each attribute
(decoding) and where it controls it (activation patching).

- **Decoding.** Random characters of the seen concepts (attributes drawn independently), each prompted by its full
  tag caption at its own seed. Every block's output is recorded at every denoising step and averaged over space and
  over the steps of each range (early, middle, late thirds). A linear read-out (:mod:`bwl.study.scoring.readout`)
  says, per block x range x attribute, how well the attribute is decoded, cross-validated, with its 95 % interval
  and chance level.
- **Patching.** For pairs of prompts that differ in one attribute, at one seed: the first prompt is run with one
  block's output replaced by the second prompt's (at every step, or one range of steps). The probe reads the
  attribute from the result; the share of images that take the second prompt's value is the block's control over
  the attribute there, with its Wilson interval. The unpatched first and second images give the floor and the ceiling.

``python -m bwl mechanism`` writes ``figures/mechanism/``: ``decoding.csv``/``.md``/``.png``,
``patching.csv``/``.md``/``.png`` and ``config.json``. The instruments themselves (:mod:`bwl.sd.activations`) work on
any SD 1.x/SDXL pipeline; on a real model the read-out needs prompts labelled with what they vary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from bwl.adapters.spec import unet_architecture
from bwl.core.atomic import finish_figure, write_json, write_text
from bwl.core.config import ConfigError
from bwl.core.hashing import file_hash
from bwl.sd.activations import patching, recording
from bwl.sd.pipeline import Pipeline, load_pipeline
from bwl.study.design.profile import Profile, load_profile
from bwl.study.experiments.adapter_blocks import run_adapter_blocks
from bwl.study.running.console import log
from bwl.study.running.study import Study
from bwl.study.scoring.readout import Readout, readout, wilson
from bwl.toy.assets import PROBE_PATH
from bwl.toy.probes import load_probe
from bwl.toy.world import BACKGROUNDS, COLORS, EYES, HATS, SHAPES, STYLES, Character

SEEN: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": tuple(COLORS), "hat": HATS, "eyes": EYES,
                                    "style": STYLES, "background": tuple(BACKGROUNDS)}
RANGES = ("early", "middle", "late")


@dataclass(frozen=True)
class Patched:
    """The share of patched images that take the second prompt's value of ``attribute``."""

    attribute: str
    block: str
    steps: str
    flipped: int
    n: int

    @property
    def share(self) -> float:
        return self.flipped / self.n


def step_ranges(steps: int) -> dict[str, list[int]]:
    """The denoising steps in each third (early: the first, where the layout forms)."""
    if steps < len(RANGES):
        raise ValueError(f"sample_steps={steps}: the step ranges need at least {len(RANGES)} steps")
    bounds = np.linspace(0, steps, 4).round().astype(int)
    return {name: list(range(bounds[i], bounds[i + 1])) for i, name in enumerate(RANGES)}


def characters(count: int, seed: int) -> list[Character]:
    """``count`` characters of the seen concepts, every attribute drawn independently."""
    rng = np.random.default_rng(seed)
    return [Character(**{a: str(rng.choice(values)) for a, values in SEEN.items()}) for _ in range(count)]


def _run(pipe: Pipeline, prompts: Sequence[str], seeds: Sequence[int], profile: Profile) -> list:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.inference_mode():
        return pipe(list(prompts), num_inference_steps=profile.sample_steps, guidance_scale=profile.guidance_scale,
                    height=profile.resolution, width=profile.resolution, generator=generators).images


def decode(pipe: Pipeline, profile: Profile, count: int, seed: int = 0,
           attributes: Sequence[str] = tuple(SEEN)) -> dict[tuple[str, str, str], Readout]:
    """Per (block, step range, attribute): the cross-validated read-out of the attribute from the block's output."""
    blocks = unet_architecture(pipe.unet).prefixes
    drawn = characters(count, seed)
    ranges = step_ranges(profile.sample_steps)
    with recording(pipe.unet, blocks, profile.sample_steps) as found:
        for start in range(0, count, profile.batch_size):
            chunk = drawn[start:start + profile.batch_size]
            _run(pipe, [c.caption() for c in chunk], range(seed + start, seed + start + len(chunk)), profile)
    results = {}
    for block in blocks:
        for name, steps in ranges.items():
            features = torch.stack([found.pooled(block, s) for s in steps]).mean(0)
            for attribute in attributes:
                results[(block, name, attribute)] = readout(features, [getattr(c, attribute) for c in drawn])
    return results


def pairs_for(attribute: str, count: int, seed: int) -> list[tuple[Character, Character]]:
    """``count`` pairs of characters that differ only in ``attribute``."""
    rng = np.random.default_rng(seed)
    found = []
    for first in characters(count, seed):
        other = str(rng.choice([v for v in SEEN[attribute] if v != getattr(first, attribute)]))
        found.append((first, replace(first, **{attribute: other})))
    return found


def patch(pipe: Pipeline, profile: Profile, count: int, seed: int = 0,
          attributes: Sequence[str] = tuple(SEEN)) -> tuple[list[Patched], dict]:
    """Per attribute, block and step range (or ``all``): how many patched images take the second prompt's value;
    and per attribute the floor (first prompt unpatched) and ceiling (second prompt's own image)."""
    blocks = unet_architecture(pipe.unet).prefixes
    probe = load_probe(PROBE_PATH)
    ranges = {"all": list(range(profile.sample_steps)), **step_ranges(profile.sample_steps)}
    results, bounds = [], {}
    for a_index, attribute in enumerate(attributes):
        pairs = pairs_for(attribute, count, seed + a_index)
        seeds = list(range(seed, seed + count))
        first, second = [p[0].caption() for p in pairs], [p[1].caption() for p in pairs]
        wanted = [getattr(p[1], attribute) for p in pairs]

        def takes(images: list, attribute: str = attribute, wanted: list[str] = wanted) -> int:
            return sum(r[attribute] == w for r, w in zip(probe.read(images), wanted))

        log(f"mechanism: patching {attribute} ({a_index + 1}/{len(attributes)})")
        with recording(pipe.unet, blocks, profile.sample_steps) as target:
            ceiling = takes(_run(pipe, second, seeds, profile))
        bounds[attribute] = {"floor": takes(_run(pipe, first, seeds, profile)), "ceiling": ceiling, "n": count}
        for block in blocks:
            for name, steps in ranges.items():
                swap = {(block, s): target.last(block, s) for s in steps}
                with patching(pipe.unet, blocks, profile.sample_steps, swap):
                    results.append(Patched(attribute, block, name, takes(_run(pipe, first, seeds, profile)), count))
    return results, bounds


def decoding_table(results: dict[tuple[str, str, str], Readout]) -> tuple[str, str]:
    """The read-outs as CSV rows and as a markdown table (blocks down, attributes across, one section per range)."""
    rows = ["block,steps,attribute,accuracy,low,high,chance,n"]
    rows += [f"{b},{r},{a},{x.accuracy:.4f},{x.low:.4f},{x.high:.4f},{x.chance:.4f},{x.n}"
             for (b, r, a), x in results.items()]
    blocks = list(dict.fromkeys(b for b, _, _ in results))
    attributes = list(dict.fromkeys(a for _, _, a in results))
    lines = []
    for name in RANGES:
        lines += [f"**{name} steps**: cross-validated accuracy [95 % interval] (chance in the header)", "",
                  "| block | " + " | ".join(f"{a} ({results[(blocks[0], name, a)].chance:.2f})" for a in attributes)
                  + " |", "|---" * (len(attributes) + 1) + "|"]
        lines += [f"| {b} | " + " | ".join(f"{results[(b, name, a)].accuracy:.2f} [{results[(b, name, a)].low:.2f}, "
                                          f"{results[(b, name, a)].high:.2f}]" for a in attributes) + " |"
                  for b in blocks]
        lines.append("")
    return "\n".join(rows) + "\n", "\n".join(lines)


def patching_table(results: list[Patched], bounds: dict) -> tuple[str, str]:
    """The patching shares as CSV rows and as a markdown table (one section per step range)."""
    rows = ["block,steps,attribute,flipped,n,share,low,high"]
    for p in results:
        low, high = wilson(p.flipped, p.n)
        rows.append(f"{p.block},{p.steps},{p.attribute},{p.flipped},{p.n},{p.share:.4f},{low:.4f},{high:.4f}")
    by_key = {(p.block, p.steps, p.attribute): p for p in results}
    blocks = list(dict.fromkeys(p.block for p in results))
    header = " | ".join(f"{a} ({bounds[a]['floor'] / bounds[a]['n']:.2f}–{bounds[a]['ceiling'] / bounds[a]['n']:.2f})"
                        for a in bounds)
    lines = []
    for name in ("all", *RANGES):
        lines += [f"**patched at {name} steps**: share taking the second prompt's value [95 % interval] "
                  "(header: unpatched floor–ceiling)", "", f"| block | {header} |", "|---" * (len(bounds) + 1) + "|"]
        for b in blocks:
            cells = [by_key[(b, name, a)] for a in bounds]
            lines.append(f"| {b} | " + " | ".join(f"{c.share:.2f} [{wilson(c.flipped, c.n)[0]:.2f}, "
                                                  f"{wilson(c.flipped, c.n)[1]:.2f}]" for c in cells) + " |")
        lines.append("")
    return "\n".join(rows) + "\n", "\n".join(lines)


def heatmaps(values: dict[str, np.ndarray], blocks: Sequence[str], attributes: Sequence[str], title: str,
             out: Path) -> Figure:
    """One heatmap per step range: blocks down, attributes across, values in [0, 1] written in each cell."""
    fig = Figure(figsize=(3.3 * len(values), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(values)))
    for ax, (name, grid) in zip(axes, values.items()):
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(attributes)), list(attributes), rotation=45, fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    return finish_figure(fig, out)


def attributes_of(profile: Profile) -> tuple[str, ...]:
    """The profile's ``mechanism_attributes`` (all six when empty), checked by name."""
    unknown = [a for a in profile.mechanism_attributes if a not in SEEN]
    if unknown:
        raise ConfigError(f"profile {profile.name}: mechanism_attributes: unknown {unknown}; valid: {', '.join(SEEN)}")
    return tuple(profile.mechanism_attributes) or tuple(SEEN)


def run_mechanism(profile: Profile, out: Path | None = None) -> Path:
    """Decoding and patching on the profile's model (``mechanism_examples`` characters, ``mechanism_pairs`` pairs per
    attribute); writes ``figures/mechanism/`` and returns its decoding table. Reused when ``config.json`` records
    the same settings and model."""
    started = time.time()
    out = out or profile.figures / "mechanism"
    examples, pairs, attributes = profile.mechanism_examples, profile.mechanism_pairs, attributes_of(profile)
    study = Study(profile)
    settings = {"model": study.model_fingerprint, "examples": examples, "pairs": pairs, "attributes": list(attributes),
                "sample_steps": profile.sample_steps, "guidance_scale": profile.guidance_scale,
                "resolution": profile.resolution, "probe": file_hash(PROBE_PATH)}
    config = out / "config.json"
    if config.exists() and json.loads(config.read_text()).get("settings") == settings:
        log(f"mechanism: maps reused ({config})")
        return out / "decoding.md"
    pipe = load_pipeline(study.model)
    blocks = list(unet_architecture(pipe.unet).prefixes)
    log(f"mechanism: decoding {len(attributes)} attributes from {examples} images")
    decoded = decode(pipe, profile, examples, attributes=attributes)
    log(f"mechanism: decoding took {(time.time() - started) / 60:.1f} min; patching {pairs} pairs per attribute")
    patched, bounds = patch(pipe, profile, pairs, attributes=attributes)
    csv, md = decoding_table(decoded)
    write_text(out / "decoding.csv", csv)
    heatmaps({r: np.array([[decoded[(b, r, a)].accuracy for a in attributes] for b in blocks]) for r in RANGES},
             blocks, attributes, "decoding: cross-validated accuracy of a linear read-out of each block's output",
             out / "decoding.png")
    shares = {(p.block, p.steps, p.attribute): p.share for p in patched}
    heatmaps({r: np.array([[shares[(b, r, a)] for a in attributes] for b in blocks]) for r in ("all", *RANGES)},
             blocks, attributes, "patching: share of images that take the second prompt's value", out / "patching.png")
    patch_csv, patch_md = patching_table(patched, bounds)
    write_text(out / "patching.csv", patch_csv)
    write_text(out / "patching.md", patch_md)
    write_text(out / "decoding.md", md)
    minutes = (time.time() - started) / 60
    write_json(config, {"settings": settings, "model_path": profile.model, "ranges": step_ranges(profile.sample_steps),
                        "minutes": round(minutes, 1), "command": f"python -m bwl mechanism --profile {profile.name}"})
    log(f"mechanism: maps in {minutes:.1f} min; {out}")
    return out / "decoding.md"


def run_mechanism_study(profile: Profile, parts: Sequence[str] = ("maps", "adapters")) -> Path:
    """``python -m bwl mechanism``: the maps on ``profile``'s model, then the adapters of its ``mechanism_adapters``
    profile (itself when empty; overrides such as ``runs_dir`` carry over), both into ``figures/mechanism/``."""
    out = profile.figures / "mechanism"
    source = profile
    if profile.mechanism_adapters and profile.mechanism_adapters != profile.name:
        source = load_profile(profile.mechanism_adapters, {"figures_dir": profile.figures_dir,
                                                           "runs_dir": profile.runs_dir} if profile.runs_dir else None)
    if "maps" in parts:
        if profile.build_tiny:
            Study(profile).prepare_data()
        run_mechanism(profile, out)
    if "adapters" in parts:
        run_adapter_blocks(source, out, profile.mechanism_seeds,
                           f"python -m bwl mechanism --profile {profile.name} --parts adapters")
    return out
