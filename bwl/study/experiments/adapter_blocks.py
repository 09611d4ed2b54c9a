"""Where trained adapters put their change, and where that change matters: the adapter half of
``python -m bwl mechanism``, over a replicated profile's identity-style pairs x training seeds.

- **Update size.** Per block, ``‖ΔW‖_F / ‖W‖_F`` over the block's adapted layers: the adapter's weight update
  (peft's ``get_delta_weight``, scaling included) against the base weights it changes. One value per adapter; pooled
  over pairs and seeds with the hierarchical bootstrap (:mod:`bwl.study.scoring.statistics`).
- **Adapter patching.** The identity and style adapters (all blocks) are loaded together. For one concept, the run
  *with* its adapter (both at weight 1) and the run *without* it (the other adapter alone) are recorded; then one
  block's output is copied from the run with it into the run without it (*gain*), or the reverse (*loss*), at every
  step. The probes read the concept from the result (identity: the probes' identity score; style: their style
  score), per image, at the same prompts and seeds; unpatched, the two runs give the floor and the ceiling.

Each replicate's per-image readings are kept in ``runs/<profile>/mechanism/``, keyed by the model, the adapter files,
the prompts and the seeds, so a rerun reuses them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from bwl.adapters.blocks import paper_block
from bwl.adapters.compose import load_adapters, set_block_weights
from bwl.adapters.methods import base_layer, carries, is_adapter_layer
from bwl.adapters.spec import unet_architecture
from bwl.core.atomic import finish_figure, write_json, write_text
from bwl.core.hashing import config_hash, file_hash
from bwl.sd.activations import patching, recording
from bwl.sd.pipeline import Pipeline, load_pipeline
from bwl.study.design.profile import Profile
from bwl.study.design.vocabulary import AdapterKey, Metric, identity, style
from bwl.study.experiments.replicate import Replicate, prepare, replicates
from bwl.study.running.console import log
from bwl.study.running.study import train_missing
from bwl.study.scoring.metrics import ProbeScorer
from bwl.study.scoring.statistics import PooledEffect, hierarchical_bootstrap

ADAPTERS: dict[str, AdapterKey] = {"identity lora": identity("lora"), "style lora": style("lora"),
                                   "identity locon": identity("locon"), "style locon": style("locon")}
"""The adapters whose update sizes are measured: the replicated study's fig2 and fig3 adapters on all blocks."""
CONCEPTS: dict[str, Metric] = {"identity": Metric.IDENTITY, "style": Metric.STYLE}
CONDITIONS = ("with", "without", "gain", "loss")


def update_sizes(unet: torch.nn.Module, name: str) -> dict[str, float]:
    """Per paper block (``other`` for layers outside them): ``‖ΔW‖_F / ‖W‖_F`` of adapter ``name`` over the block's
    adapted layers, in the U-Net's block order."""
    arch = unet_architecture(unet)
    delta, base = defaultdict(float), defaultdict(float)
    for module_name, module in unet.named_modules():
        if not (is_adapter_layer(module) and carries(module, name)):
            continue
        block = paper_block(module_name, arch) or "other"
        with torch.no_grad():
            delta[block] += float(module.get_delta_weight(name).float().pow(2).sum())
            base[block] += float(base_layer(module).weight.float().pow(2).sum())
    if not delta:
        raise ValueError(f"adapter {name!r} is on no layer of this U-Net")
    order = [*arch.paper_blocks, "other"]
    return {b: math.sqrt(delta[b] / base[b]) for b in order if b in delta}


@dataclass(frozen=True)
class Reading:
    """One image's probe reading of ``concept`` under one condition (``block`` is "" for the unpatched runs)."""

    concept: str
    condition: str
    block: str
    image: int
    value: float


def _images(pipe: Pipeline, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
            size: int) -> list:
    jobs = [(p, s) for s in seeds for p in prompts]
    generators = [torch.Generator().manual_seed(s) for _, s in jobs]
    with torch.inference_mode():
        return pipe([p for p, _ in jobs], num_inference_steps=steps, guidance_scale=guidance, height=size,
                    width=size, generator=generators).images


def patch_adapters(pipe: Pipeline, scorer: ProbeScorer, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                   guidance: float = 7.0, size: int = 32, names: dict[str, str] | None = None) -> list[Reading]:
    """With an identity and a style adapter loaded in ``pipe`` (``names``: concept -> adapter name, by default
    ``identity`` and ``style``): per concept, the readings with and without its adapter, and with one block's output
    copied from one run into the other (see the module)."""
    names = names or {concept: concept for concept in CONCEPTS}
    blocks = unet_architecture(pipe.unet).prefixes
    asked = [p for _ in seeds for p in prompts]
    found: list[Reading] = []

    def read(concept: str, condition: str, block: str, images: list) -> None:
        scores = scorer(images, asked)
        found.extend(Reading(concept, condition, block, i, s[CONCEPTS[concept].value]) for i, s in enumerate(scores))

    def generate() -> list:
        return _images(pipe, prompts, seeds, steps, guidance, size)

    for concept in CONCEPTS:
        weights = {"with": {names[c]: 1.0 for c in CONCEPTS},
                   "without": {names[c]: 1.0 for c in CONCEPTS if c != concept}}
        recorded = {}
        for condition, active in weights.items():
            set_block_weights(pipe, active)
            with recording(pipe.unet, blocks, steps) as recorded[condition]:
                read(concept, condition, "", generate())
        for block in blocks:
            for condition, into, source in (("gain", "without", "with"), ("loss", "with", "without")):
                set_block_weights(pipe, weights[into])
                swap = {(block, s): recorded[source].last(block, s) for s in range(steps)}
                with patching(pipe.unet, blocks, steps, swap):
                    read(concept, condition, block, generate())
    return found


def _readings_csv(readings: Sequence[Reading]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["concept", "condition", "block", "image", "value"])
    writer.writerows([r.concept, r.condition, r.block, r.image, f"{r.value:.6f}"] for r in readings)
    return text.getvalue()


def _read_readings(path: Path) -> list[Reading]:
    with path.open() as f:
        return [Reading(r["concept"], r["condition"], r["block"], int(r["image"]), float(r["value"]))
                for r in csv.DictReader(f)]


def replicate_readings(replicate: Replicate, seeds: Sequence[int]) -> tuple[dict[str, dict[str, float]],
                                                                          list[Reading], float]:
    """One replicate's update sizes (per adapter label, per block), adapter-patching readings and the seconds the
    patching took; the readings are reused from ``runs/<profile>/mechanism/`` (with their recorded time) when their
    key matches."""
    study, profile = replicate.study, replicate.study.profile
    files = study.adapter_files(list(ADAPTERS.values()))
    missing = [str(k) for k, f in files.items() if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{replicate.name}: adapters not trained yet: {missing}")
    pipe = load_pipeline(study.model)
    load_adapters(pipe, {label.replace(" ", "-"): files[key] for label, key in ADAPTERS.items()})
    sizes = {label: update_sizes(pipe.unet, label.replace(" ", "-")) for label in ADAPTERS}
    prompts = [p for p in profile.prompts if profile.identity_trigger in p and profile.style_trigger in p]
    key = config_hash({"model": study.model_fingerprint, "files": {str(k): file_hash(f) for k, f in files.items()},
                       "prompts": prompts, "seeds": list(seeds), "steps": profile.sample_steps,
                       "guidance": profile.guidance_scale, "size": profile.resolution, "probes": ProbeScorer().version})
    cached = study.out / "mechanism" / f"{replicate.name}-{key}.csv"
    timing = cached.with_suffix(".json")
    if cached.exists() and timing.exists():
        return sizes, _read_readings(cached), json.loads(timing.read_text())["seconds"]
    log(f"mechanism: adapter patching on {replicate.name} ({len(prompts)} prompts x {len(seeds)} seeds)")
    started = time.time()
    readings = patch_adapters(pipe, ProbeScorer(pair=replicate.pair), prompts, seeds, profile.sample_steps,
                              profile.guidance_scale, profile.resolution, {c: f"{c}-lora" for c in CONCEPTS})
    seconds = time.time() - started
    write_text(cached, _readings_csv(readings))
    write_json(timing, {"seconds": round(seconds, 1)})
    return sizes, readings, seconds


Pooled = dict[tuple[str, str, str], PooledEffect]


def pool_sizes(sizes: dict[tuple[str, int], dict[str, dict[str, float]]]) -> Pooled:
    """Per (adapter label, block, ""): the update size pooled over pairs and seeds, with its 95 % CI."""
    tables: dict[tuple[str, str, str], dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    for (pair, seed), by_label in sizes.items():
        for label, by_block in by_label.items():
            for block, value in by_block.items():
                tables[(label, block, "")][pair][seed] = [value]
    return {k: hierarchical_bootstrap(t) for k, t in tables.items()}


def pool_readings(readings: dict[tuple[str, int], list[Reading]]) -> Pooled:
    """Per (concept, condition, block): the mean probe reading pooled over pairs, seeds and images, with its CI."""
    tables: dict[tuple[str, str, str], dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for (pair, seed), found in readings.items():
        for r in found:
            tables[(r.concept, r.condition, r.block)][pair][seed].append(r.value)
    return {k: hierarchical_bootstrap(t) for k, t in tables.items()}


def _cell(effect: PooledEffect) -> str:
    return f"{effect.mean:.2f} [{effect.low:.2f}, {effect.high:.2f}]"


def sizes_table(pooled: Pooled, order: Sequence[str]) -> tuple[str, str]:
    """The update sizes as CSV and as markdown (blocks down in U-Net ``order``, adapters across)."""
    labels = list(dict.fromkeys(k[0] for k in pooled))
    blocks = [b for b in order if any(k[1] == b for k in pooled)]
    rows = ["adapter,block,size,low,high,replicates"]
    rows += [f"{a},{b},{e.mean:.5f},{e.low:.5f},{e.high:.5f},{e.seeds}" for (a, b, _), e in pooled.items()]
    n = next(iter(pooled.values())).seeds
    lines = [f"Relative weight update ‖ΔW‖/‖W‖ per block, mean over {n} replicates [95 % CI]", "",
             "| block | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {b} | " + " | ".join(_cell(pooled[(a, b, "")]) if (a, b, "") in pooled else "–" for a in labels)
              + " |" for b in blocks]
    return "\n".join(rows) + "\n", "\n".join(lines) + "\n"


def patching_table(pooled: Pooled, blocks: Sequence[str]) -> tuple[str, str]:
    """The adapter-patching readings as CSV and as markdown (blocks down; gain and loss per concept across)."""
    rows = ["concept,condition,block,mean,low,high,replicates,images"]
    rows += [f"{c},{d},{b},{e.mean:.4f},{e.low:.4f},{e.high:.4f},{e.seeds},{e.images}"
             for (c, d, b), e in pooled.items()]
    header = " | ".join(f"{c} {d} ({_cell(pooled[(c, 'without', '')])} → {_cell(pooled[(c, 'with', '')])})"
                        for c in CONCEPTS for d in ("gain", "loss"))
    lines = ["Probe reading after copying one block's output between the run with the concept's adapter and the run "
             "without it (gain: into the run without; loss: into the run with), pooled mean [95 % CI]; the header "
             "gives the unpatched run without → with.", "", f"| block | {header} |", "|---" * 5 + "|"]
    lines += [f"| {b} | " + " | ".join(_cell(pooled[(c, d, b)]) for c in CONCEPTS for d in ("gain", "loss")) + " |"
              for b in blocks]
    return "\n".join(rows) + "\n", "\n".join(lines) + "\n"


def _bars(ax, blocks: Sequence[str], series: dict[str, list[PooledEffect | None]]) -> None:
    """Bars with their CIs, one series per label; a block a series lacks (None) gets no bar."""
    width = 0.8 / len(series)
    for i, (label, effects) in enumerate(series.items()):
        found = [(j, e) for j, e in enumerate(effects) if e is not None]
        x = np.array([j for j, _ in found]) + (i - (len(series) - 1) / 2) * width
        means = np.array([e.mean for _, e in found])
        errors = np.array([[e.mean - e.low for _, e in found], [e.high - e.mean for _, e in found]])
        ax.bar(x, means, width, yerr=errors, label=label, capsize=2)
    ax.set_xticks(range(len(blocks)), list(blocks), fontsize=7)
    ax.legend(fontsize=6)


def adapters_figure(sizes: Pooled, patched: Pooled, blocks: Sequence[str], out: Path) -> Figure:
    """Left: update size per block and adapter; right: adapter patching per block (gain and loss per concept),
    with the unpatched floor and ceiling as lines."""
    fig = Figure(figsize=(13, 3.4))
    left, *right = fig.subplots(1, 1 + len(CONCEPTS))
    labels = list(dict.fromkeys(k[0] for k in sizes))
    size_blocks = [b for b in blocks if any((a, b, "") in sizes for a in labels)]  # LoRA: no IN3, OUT0
    _bars(left, size_blocks, {a: [sizes.get((a, b, "")) for b in size_blocks] for a in labels})
    left.set_title("relative weight update ‖ΔW‖/‖W‖ (LoRA: attention blocks only)", fontsize=9)
    for ax, concept in zip(right, CONCEPTS):
        _bars(ax, blocks, {d: [patched[(concept, d, b)] for b in blocks] for d in ("gain", "loss")})
        for condition, style_ in (("without", ":"), ("with", "--")):
            ax.axhline(patched[(concept, condition, "")].mean, color="grey", linestyle=style_, linewidth=1)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{concept}: probe reading after patching one block (lines: without, with)", fontsize=8)
    return finish_figure(fig, out)


def run_adapter_blocks(profile: Profile, out: Path, seeds: Sequence[int] = (0, 1),
                       command: str = "python -m bwl mechanism --parts adapters") -> Path:
    """Update sizes and adapter patching over ``profile``'s replicates (training the adapters it lacks); writes
    ``adapter-sizes``, ``adapter-patching`` (``.csv``/``.md``), ``adapters.png`` and ``adapters.json`` in ``out`` and
    returns the patching table."""
    started = time.time()
    prepare(profile)
    runs = replicates(profile)
    train_missing([(r.study, key) for r in runs for key in ADAPTERS.values()], profile.train_workers)
    sizes, readings, seconds = {}, {}, 0.0
    for r in runs:
        sizes[(r.pair.name, r.seed)], readings[(r.pair.name, r.seed)], took = replicate_readings(r, seeds)
        seconds += took
    pooled_sizes, pooled = pool_sizes(sizes), pool_readings(readings)
    blocks = list(dict.fromkeys(r.block for found in readings.values() for r in found if r.block))
    for name, (table, md) in {"adapter-sizes": sizes_table(pooled_sizes, blocks),
                              "adapter-patching": patching_table(pooled, blocks)}.items():
        write_text(out / f"{name}.csv", table)
        write_text(out / f"{name}.md", md)
    adapters_figure(pooled_sizes, pooled, blocks, out / "adapters.png")
    minutes = (time.time() - started) / 60
    write_json(out / "adapters.json", {
        "profile": profile.name, "replicates": [r.name for r in runs], "adapters": {k: str(v) for k, v in
                                                                                   ADAPTERS.items()},
        "patched_with": "identity lora + style lora", "prompts": [p for p in profile.prompts
                                                                  if profile.identity_trigger in p
                                                                  and profile.style_trigger in p],
        "seeds": list(seeds), "sample_steps": profile.sample_steps,
        "patching_minutes": round(seconds / 60, 1),  # generating and reading the patched images, all replicates
        "minutes": round(minutes, 1),  # this invocation (adapters trained or reused, readings made or reused)
        "command": command})
    log(f"mechanism: adapters over {len(runs)} replicates in {minutes:.1f} min; {out}")
    return out / "adapter-patching.md"
