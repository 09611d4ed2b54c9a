"""Quality gates of the toy world, measured: does the micro SD draw what seen prompts ask, and do the identity and
style adapters make their held-out concepts appear? ``python -m bwl gates``."""

from __future__ import annotations

import numpy as np

from bwl.sd.generate import generate
from bwl.sd.pipeline import load_pipeline
from bwl.study.design.profile import Profile, load_profile
from bwl.study.design.vocabulary import BASE, FIDELITY, ID_ALONE, STYLE_ALONE
from bwl.study.experiments.replicate import replicates
from bwl.study.running.study import Study
from bwl.study.scoring.metrics import Estimate
from bwl.study.scoring.results import CellResult
from bwl.toy.assets import PROBE_PATH
from bwl.toy.probes import load_probe
from bwl.toy.world import ATTRIBUTES, sample_character


def seen_prompt_accuracy(pipe, probe, count: int = 64, seed: int = 7, steps: int = 25) -> dict[str, float]:
    """Per-attribute accuracy of the probe's reading of samples for random seen characters' full captions."""
    rng = np.random.default_rng(seed)
    characters = [sample_character(rng) for _ in range(count)]
    images = []
    for i, c in enumerate(characters):
        images += generate(pipe, [c.caption()], [seed * 1000 + i], steps, size=32)
    readings = probe.read(images)
    accuracy = {k: float(np.mean([r[k] == getattr(c, k) for r, c in zip(readings, characters)])) for k in ATTRIBUTES}
    accuracy["mean"] = float(np.mean(list(accuracy.values())))
    return accuracy


def adapter_gates(results: list[CellResult]) -> dict[str, Estimate]:
    """Identity and style fidelity of the base model vs each full adapter alone (LoRA and LoCon grids)."""
    out = {}
    for row in results:
        if row.grid in ("fig2", "fig3") and row.cell in (BASE, ID_ALONE, STYLE_ALONE):
            for metric in FIDELITY:
                if row[metric].n:
                    out[f"{row.grid} {row.cell} {metric.value}"] = row[metric]
    return out


def gates_study(settings: Profile) -> Study:
    """The study whose adapters the gates read: the profile's own (``python -m bwl run``) or, for a replicated profile
    without one, its first replicate (``python -m bwl replicate``: the first pair and training seed)."""
    study = Study(settings)
    if settings.pairs and not (study.figures / "results.csv").exists():
        return replicates(settings)[0].study
    return study


def gates(profile: str = "toy", count: int = 64) -> dict:
    """All gates for a profile whose study has run (:func:`gates_study`)."""
    study = gates_study(load_profile(profile))
    pipe = load_pipeline(study.model)
    accuracy = seen_prompt_accuracy(pipe, load_probe(PROBE_PATH), count=count)
    return {"seen_prompt_accuracy": accuracy, "adapters": adapter_gates(study.results()), "count": count}


SEEN_TARGET = 0.80  # the share of attributes the probe must read off samples for seen prompts


def gates_markdown(measured: dict, command: str = "python -m bwl gates") -> str:
    """The gates as a table: what each asks, its target and what was measured (``figures/gates.md``)."""
    accuracy, adapters = measured["seen_prompt_accuracy"], measured["adapters"]
    parts = ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items() if k != "mean")
    seen = f"{accuracy['mean']:.1%} mean: {parts}"
    lines = [f"Measured by `{command}` with `{PROBE_PATH.name}` on {measured['count']} samples for random seen "
             "captions (the paper's sampler); the adapters' rows come from the toy study's results table.", "",
             "| gate | target | measured | |", "|---|---|---|---|",
             f"| the probe reads samples of the micro SD for seen prompts | ≥ {SEEN_TARGET:.0%} of attributes | "
             f"{seen} | {'met' if accuracy['mean'] >= SEEN_TARGET else '**not met**'} |"]
    for grid, method in (("fig2", "LoRA"), ("fig3", "LoCon")):
        for cell, metric in ((ID_ALONE, "identity"), (STYLE_ALONE, "style")):
            shown, base = adapters.get(f"{grid} {cell} {metric}"), adapters.get(f"{grid} {BASE} {metric}")
            if shown and base:
                above = shown.mean - shown.ci > base.mean + base.ci
                verdict = "met" if above else "**not met**"
                lines.append(f"| {method} {cell} (all blocks) makes the {metric} appear with its trigger | above the "
                             f"base model, 95 % CIs apart | {shown} vs base {base} | {verdict} |")
    return "\n".join(lines) + "\n"
