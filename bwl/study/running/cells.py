"""Grid cells: the one generate -> score -> save path that the paper's grids and the block sweep share.

A cell is keyed by everything its images depend on: the base model and each adapter by content, the weights, the
prompts, seeds, sampler steps, guidance scale and size. ``cells/<key>/`` holds ``images.npz``, ``cell.json`` and
``scores.json``, written last, whose presence marks a complete cell; a rerun reuses complete cells. ``cell.json``'s
``scored_with`` records each metric family's scorer version: a family the profile asks for that is missing, or was
scored by another version (other encoders, instrument or measures), is scored again from the stored images.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from diffusers import StableDiffusionPipeline
from PIL import Image

from bwl import __version__
from bwl.adapters.compose import load_adapters, set_block_weights
from bwl.adapters.modes import combination_mode
from bwl.core.atomic import atomic_path, write_json
from bwl.core.hashing import config_hash
from bwl.core.locks import claim
from bwl.sd.generate import generate
from bwl.study.design.profile import Profile
from bwl.study.design.vocabulary import BASE, AdapterKey, Cell, Metric
from bwl.study.running.console import log
from bwl.study.running.distributed import barrier, is_main, launched, share
from bwl.study.scoring.metrics import Estimate, Scorers, Scores, spreads, summarize, without_families


class CellStore:
    """The cells of one profile's run, on disk under ``<runs>/cells``."""

    def __init__(self, root: Path):
        self.root = root

    def folder(self, key: str) -> Path:
        return self.root / key

    def complete(self, key: str) -> bool:
        return (self.folder(key) / "scores.json").exists()

    def images(self, key: str) -> list[Image.Image]:
        with np.load(self.folder(key) / "images.npz") as data:
            return [Image.fromarray(a) for a in data["images"]]

    def description(self, key: str) -> dict:
        """The cell's ``cell.json``: what made it (and, for cells generated since it was recorded, ``seconds``)."""
        return json.loads((self.folder(key) / "cell.json").read_text())

    def scores(self, key: str) -> list[Scores]:
        return json.loads((self.folder(key) / "scores.json").read_text())

    def summary(self, key: str) -> dict[Metric, Estimate]:
        """The cell's mean and 95 % CI per metric."""
        return summarize(self.scores(key))

    def spreads(self, key: str) -> dict[Metric, float]:
        """The probes' spread per metric (:func:`bwl.study.scoring.metrics.spreads`)."""
        return spreads(self.scores(key))

    def save(self, key: str, images: list[Image.Image], description: dict, scores: list[Scores]) -> None:
        """Images, then the cell's description, then its scores (last: they mark the cell complete)."""
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=np.stack([np.asarray(img) for img in images]))
        with atomic_path(folder / "images.npz") as tmp:
            tmp.write_bytes(buffer.getvalue())
        write_json(folder / "cell.json", {**description, "bwl_version": __version__})
        write_json(folder / "scores.json", scores)


def cell_key(profile: Profile, cell: Cell, prompts: Sequence[str], seeds: Sequence[int], model_fingerprint: str,
             file_hashes: dict[AdapterKey, str], scope: str = "", device_type: str = "cpu") -> str:
    """A cell's key: a hash of everything its images and scores depend on."""
    p = profile
    values = {
        "model": model_fingerprint, "weights": {k: str(w) for k, w in cell.named_weights().items()},
        "files": {str(k): file_hashes[k] for k in cell.weights}, "prompts": list(prompts),
        "seeds": list(seeds), "steps": p.sample_steps, "cfg": p.guidance_scale, "size": p.resolution,
    }
    if scope:
        values["scope"] = scope
    if cell.mode:
        values["mode"] = cell.mode
    if device_type != "cpu":  # a GPU's images differ from the CPU's in their last bits
        values["device"] = device_type
    return config_hash(values)


def cell_images(pipe: StableDiffusionPipeline, profile: Profile, cell: Cell, prompts: Sequence[str],
                seeds: Sequence[int]) -> list[Image.Image]:
    """A cell's images, its adapters loaded: at the cell's weights, or combined step by step by its mode."""
    p = profile
    set_block_weights(pipe, cell.named_weights())
    if not cell.mode:
        return generate(pipe, prompts, seeds, p.sample_steps, p.guidance_scale, p.batch_size, p.resolution)
    with combination_mode(pipe, cell.mode, *cell.named_weights()).applied(p.sample_steps) as extra:
        return generate(pipe, prompts, seeds, p.sample_steps, p.guidance_scale, p.batch_size, p.resolution, extra)


class CellRenderer:
    """Generates, scores and saves cells on one loaded pipeline, loading each cell's adapters as it needs them.

    Adapters in ``resident`` stay loaded between cells (the grids' few); others are unloaded after their cell (the
    sweep's many), so the pipeline never carries more than a cell needs beyond them.
    """

    def __init__(self, pipe: StableDiffusionPipeline, profile: Profile, store: CellStore, model_fingerprint: str,
                 files: dict[AdapterKey, Path], file_hashes: dict[AdapterKey, str], scorer: Scorers | None,
                 resident: Sequence[AdapterKey] = (), scope: str = ""):
        """``scope``: what else the cells' scores depend on (a replicate's concept pair: the base model's cells are
        scored against each pair's identity and style), part of every cell's key when set."""
        self.pipe, self.profile, self.store, self.scorer = pipe, profile, store, scorer
        self.scope = scope
        self.model_fingerprint, self.files, self.file_hashes = model_fingerprint, files, file_hashes
        self.resident = set(resident)
        self.device_type = pipe.device.type if pipe is not None else "cpu"

    def key(self, cell: Cell, prompts: Sequence[str], seeds: Sequence[int]) -> str:
        return cell_key(self.profile, cell, prompts, seeds, self.model_fingerprint, self.file_hashes, self.scope,
                        self.device_type)

    def render_many(self, jobs: Sequence[tuple[Cell, Sequence[str], Sequence[int]]],
                    done: Callable[[], object] = lambda: None) -> list[tuple[str, bool]]:
        """:meth:`render` for every job, in order. Under ``accelerate launch`` each process renders its share (the
        base cells the reference metrics compare with first, by the main process) and all wait for the others, so
        every returned key is complete; ``generated`` is True only for cells this process generated. ``done`` is
        called after each cell this process renders (a progress bar's update)."""
        def render(job: tuple[Cell, Sequence[str], Sequence[int]]) -> tuple[str, bool]:
            rendered = self.render(*job)
            done()
            return rendered

        if not launched():
            return [render(job) for job in jobs]
        if self.scorer is not None and self.scorer.needs_base and is_main():
            for prompts, seeds in dict.fromkeys((tuple(p), tuple(s)) for _, p, s in jobs):
                self.render(Cell(BASE), prompts, seeds)
        barrier()
        mine = {i: render(jobs[i]) for i in share(range(len(jobs)))}
        barrier()
        return [mine.get(i, (self.key(*job), False)) for i, job in enumerate(jobs)]

    def render(self, cell: Cell, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[str, bool]:
        """The cell's key, and whether it was generated now (False: reused; a family the profile scores with that the
        stored cell lacks, or holds from another scorer version, is scored from its stored images)."""
        key = self.key(cell, prompts, seeds)
        if not self.store.complete(key):
            with claim(self.store.folder(key), f"cell {cell.label}", log):  # another run may be making it
                if not self.store.complete(key):
                    self._generate(key, cell, prompts, seeds)
                    return key, True
        self._score_missing(key, cell, prompts, seeds)
        return key, False

    def _generate(self, key: str, cell: Cell, prompts: Sequence[str], seeds: Sequence[int]) -> None:
        p = self.profile
        load_adapters(self.pipe, {str(k): self.files[k] for k in cell.weights})
        started = time.perf_counter()
        images = cell_images(self.pipe, p, cell, prompts, seeds)
        seconds = time.perf_counter() - started
        transient = [str(k) for k in cell.weights if k not in self.resident]
        if transient:
            with warnings.catch_warnings():  # peft names a new active adapter per layer; the next cell sets its own
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                self.pipe.delete_adapters(transient)
        scores = self._score(self.scorer, cell, images, prompts, seeds)
        description = {"cell": cell.label, "adapters": {k: str(w) for k, w in cell.named_weights().items()},
                       "mode": cell.mode, "seconds": round(seconds, 2),
                       "prompts": list(prompts), "seeds": list(seeds), "steps": p.sample_steps,
                       "cfg": p.guidance_scale, "size": p.resolution,
                       "scored_with": dict(self.scorer.versions) if self.scorer is not None else {}}
        self.store.save(key, images, description, scores)

    def _score(self, scorer: Scorers | None, cell: Cell, images: list[Image.Image], prompts: Sequence[str],
               seeds: Sequence[int]) -> list[Scores]:
        job_prompts = [prompt for prompt in prompts for _ in seeds]
        if scorer is None:
            return [{} for _ in images]
        base = None
        if scorer.needs_base:  # the base model's images at the same prompts and seeds (the base cell's own)
            base = images if not cell.adapters else self.store.images(self.render(Cell(BASE), prompts, seeds)[0])
        return scorer(images, job_prompts, base)

    def _score_missing(self, key: str, cell: Cell, prompts: Sequence[str], seeds: Sequence[int]) -> None:
        if self.scorer is None:
            return
        folder = self.store.folder(key)
        description = json.loads((folder / "cell.json").read_text())
        scores = self.store.scores(key)
        done = description.get("scored_with", {})
        done = done if isinstance(done, dict) else {}  # a bare list of families: versions unknown, scored again
        stale = [f for f in self.scorer.families if done.get(f) != self.scorer.versions[f]]
        if not stale:
            return
        extra = self._score(self.scorer.only(stale), cell, self.store.images(key), prompts, seeds)
        kept = without_families(scores, stale)
        write_json(folder / "scores.json", [{**old, **new} for old, new in zip(kept, extra)])
        write_json(folder / "cell.json", {**description,
                                          "scored_with": {**done, **{f: self.scorer.versions[f] for f in stale}}})
