"""The study: profiles, the adapters the paper's grids need (trained once, keyed by a hash of their config and
data), the grids themselves (fig2, fig3, fig4a, fig4b, plus reference columns), metrics and figures.

A run is ``defaults + one profile (bwl/profiles/<name>.yaml) + overrides`` and nothing else.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import queue
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__
from .atomic import atomic_path, write_json, write_text
from .config import ConfigError, build, read_file
from .metrics import METRICS, Estimate, image_scores, summarize

ROOT = Path(__file__).resolve().parent.parent
PROFILES = Path(__file__).resolve().parent / "profiles"

def adapter_parts(key: str) -> tuple[str, str, str]:
    """(concept, method, blocks) of an adapter key such as ``id_lora_all`` or ``style_locon_IN0+OUT3``."""
    concept, method, blocks = key.split("_", 2)
    return {"id": "identity"}.get(concept, concept), method, blocks


def _method_grid(m: str) -> dict[str, dict]:
    return {
        "full ID + full style": {f"id_{m}_all": 1.0, f"style_{m}_all": 1.0},
        "full ID + full style, inference on upper": {f"id_{m}_all": 1.0, f"style_{m}_all": "upper"},
        "full ID + upper-trained style": {f"id_{m}_all": 1.0, f"style_{m}_upper": 1.0},
    }


GRIDS: dict[str, dict[str, dict]] = {
    "fig2": _method_grid("lora"),
    "fig3": _method_grid("locon"),
    "fig4a": {
        "upper ID + full style": {"id_locon_upper": 1.0, "style_locon_all": 1.0},
        "upper ID + upper style": {"id_locon_upper": 1.0, "style_locon_upper": 1.0},
        "full ID + upper style": {"id_locon_all": 1.0, "style_locon_upper": 1.0},
    },
    "fig4b": {
        "full ID + upper style": {"id_locon_all": 1.0, "style_locon_upper": 1.0},
        "full ID + middle style": {"id_locon_all": 1.0, "style_locon_middle": 1.0},
        "full ID + bottom style": {"id_locon_all": 1.0, "style_locon_bottom": 1.0},
    },
}
GRID_METHOD = {"fig2": "lora", "fig3": "locon", "fig4a": "locon", "fig4b": "locon"}


def references(method: str) -> dict[str, dict]:
    """The reference columns of a grid: base model and each full adapter alone."""
    return {"base": {}, "ID alone": {f"id_{method}_all": 1.0}, "style alone": {f"style_{method}_all": 1.0}}


@dataclass
class Profile:
    """One study setting. Keys not listed here are refused with their names."""

    name: str = "toy"
    model: str = "data/toy-sd"
    build_tiny: bool = False
    resolution: int = 32
    concepts: str = "toy"
    identity_dir: str = ""
    style_dir: str = ""
    identity_trigger: str = "zkc"
    style_trigger: str = "qrv"
    class_word: str = ""
    tagger: str = "toy"
    tagger_model: str = ""
    blacklist_identity: list[str] = field(default_factory=list)
    blacklist_style: list[str] = field(default_factory=list)
    reg_count: int = 0
    reg_prompt: str = ""
    train: dict = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: list(range(8)))
    sample_steps: int = 25
    guidance_scale: float = 7.0
    batch_size: int = 40
    grids: list[str] = field(default_factory=lambda: list(GRIDS))
    figure_rows: int = 4
    figures_dir: str = "figures"
    runs_dir: str = ""
    metrics: str = "probe"
    sweep_pairs: bool = True
    sweep_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    train_workers: int = 1  # adapters trained at once, in separate processes sharing the CPU threads (CPU only)

    def path(self, value: str) -> Path:
        """A profile path, relative to the repository root unless absolute."""
        p = Path(value)
        return p if p.is_absolute() else ROOT / p

    @property
    def out(self) -> Path:
        return self.path(self.runs_dir or f"runs/{self.name}")


def load_profile(name: str = "toy", overrides: dict | None = None) -> Profile:
    """``bwl/profiles/<name>.yaml`` (or a YAML path) plus overrides; unknown keys raise naming them."""
    path = Path(name) if name.endswith((".yaml", ".yml", ".json")) else PROFILES / f"{name}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise ConfigError(f"unknown profile {name!r}; valid: {valid} (or a path to a YAML file)")
    values = {"name": path.stem, **read_file(path), **(overrides or {})}
    profile = build(Profile, values, source=f"profile {path.name}")
    from .train import TrainConfig

    build(TrainConfig, dict(profile.train), source=f"profile {path.name}: train")
    unknown = [g for g in profile.grids if g not in GRIDS]
    if unknown:
        raise ConfigError(f"profile {path.name}: unknown grid(s) {unknown}; valid: {', '.join(GRIDS)}")
    return profile


def fingerprint(folder: Path) -> str:
    """A hash of a dataset folder's files (names and bytes), so changed captions or images mean a new run."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def config_hash(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def file_hash(path: Path) -> str:
    """A hash of one file's bytes (an adapter file in a grid cell's key)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def train_one(config) -> Path:
    """Train one adapter from its ``TrainConfig`` (resuming its checkpoints if a run was cut off)."""
    from .pipeline import load_pipeline
    from .train import train

    config.resume = any((Path(config.output_dir) / "checkpoints").glob("*.safetensors"))
    return train(config, pipe=load_pipeline(config.model))


class _QueuedLines(io.TextIOBase):
    """A worker process's stdout: each whole line goes to the parent through a queue, prefixed with the adapter."""

    def __init__(self, lines, prefix: str):
        self.lines, self.prefix, self.partial = lines, prefix, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *whole, self.partial = (self.partial + text).split("\n")
        for line in whole:
            self.lines.put(f"{self.prefix}{line}")
        return len(text)


_worker_lines = None


def _start_worker(threads: int, lines) -> None:
    import torch

    global _worker_lines
    torch.set_num_threads(threads)
    _worker_lines = lines


def _train_in_worker(key: str, config) -> Path:
    sys.stdout = _QueuedLines(_worker_lines, f"{key}: ")
    return train_one(config)


def train_adapters(configs: dict[str, object], workers: int = 1, log=print) -> None:
    """Train these adapters: one after another, or ``workers`` at a time in spawned processes on CPU.

    Small models use two CPU threads poorly, so two one-thread processes train about 1.6x as many steps a second
    as one two-thread process (toy profile). The workers' step lines come back through a queue to ``log``, each
    prefixed with its adapter, so they are written once, by this process.
    """
    import torch

    total = len(configs)
    if workers <= 1 or total <= 1 or torch.cuda.is_available():
        for i, (key, config) in enumerate(configs.items(), 1):
            log(f"[{i}/{total}] {key}: training {config.method} on {config.blocks} for {config.steps} steps")
            train_one(config)
        return
    threads = max(1, torch.get_num_threads() // workers)
    log(f"training {total} adapters, {workers} at a time ({threads} thread(s) each)")
    context = multiprocessing.get_context("spawn")
    lines = context.Queue()

    def relay() -> None:
        while True:
            try:
                log(lines.get_nowait())
            except queue.Empty:
                return

    started, done = time.time(), 0
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(threads, lines)) as pool:
        running = {pool.submit(_train_in_worker, key, config): key for key, config in configs.items()}
        while running:
            finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            relay()
            for future in finished:
                error = future.exception()
                if error is not None:
                    for waiting in running:
                        waiting.cancel()
                    raise error
                done += 1
                log(f"[{done}/{total}] {running.pop(future)}: trained ({time.time() - started:.0f} s since start)")
    relay()


def cell_key(profile: Profile, model_fingerprint: str, adapters: dict[str, object], adapter_hashes: dict[str, str]) -> str:
    """A key for a grid cell's images: base model and adapters (by content: ``file_hash`` of each adapter file, computed
    once per run), weights, prompts, seeds and sampler."""
    return config_hash({
        "model": model_fingerprint, "weights": {k: str(v) for k, v in adapters.items()},
        "files": {k: adapter_hashes[k] for k in adapters}, "prompts": profile.prompts, "seeds": profile.seeds,
        "steps": profile.sample_steps, "cfg": profile.guidance_scale,
    })


class Study:
    """One profile's study: data -> adapters -> grid images -> metrics -> figures, each stage reusing what exists."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.out = profile.out
        self.model = profile.path(profile.model) if (ROOT / profile.model).exists() or profile.build_tiny else profile.model
        self._model_fingerprint: str | None = None

    @property
    def model_fingerprint(self) -> str:
        """The base model by content (a hash of its local files) or by hub id, so that adapters and cells made
        with other weights under the same name are never reused."""
        if self._model_fingerprint is None:
            if not Path(self.model).is_dir():
                return str(self.model)
            self._model_fingerprint = fingerprint(Path(self.model))
        return self._model_fingerprint

    # ----- data --------------------------------------------------------------------------------------------------

    def concept_dir(self, concept: str) -> Path:
        return self.out / "data" / concept

    def prepare_data(self, interactive: bool = False) -> dict[str, list]:
        """Images into ``runs/<profile>/data/{identity,style}``, tagged and corrected; reg images if asked."""
        from .captions import write_captions
        from .data import prepare_folder
        from .tagging import make_tagger

        p = self.profile
        if p.build_tiny and not (Path(self.model) / "model_index.json").exists():
            from .tiny import build_tiny_pipeline

            build_tiny_pipeline(self.model)
        reports = {}
        tagger = make_tagger(p.tagger, p.tagger_model or None)
        for concept, trigger, blacklist in (("identity", p.identity_trigger, p.blacklist_identity),
                                            ("style", p.style_trigger, p.blacklist_style)):
            folder = self.concept_dir(concept)
            if p.concepts == "toy":
                from .toy import write_concept

                write_concept(folder, concept)
                reports[concept] = []
            else:
                source = p.path(getattr(p, f"{concept}_dir"))
                reports[concept] = prepare_folder(source, folder, resolution=max(p.resolution, 512))
            class_word = p.class_word if concept == "identity" else ""
            write_captions(folder, tagger, trigger, class_word, blacklist=blacklist)
        if p.reg_count:
            from .pipeline import load_pipeline
            from .regularization import generate_regularization

            generate_regularization(load_pipeline(self.model), self.out / "data" / "reg", p.reg_prompt, p.reg_count, p.resolution)
        write_json(self.out / "data" / "profile.json", dataclasses.asdict(p))
        return reports

    # ----- adapters ----------------------------------------------------------------------------------------------

    def needed_adapters(self) -> list[str]:
        keys = []
        for grid in self.profile.grids:
            for cell in (*GRIDS[grid].values(), *references(GRID_METHOD[grid]).values()):
                keys += [k for k in cell if k not in keys]
        return keys

    def train_config(self, key: str):
        """The ``TrainConfig`` of one adapter: profile training settings + concept, method and blocks."""
        from .train import TrainConfig

        concept, method, blocks = adapter_parts(key)
        p = self.profile
        values = dict(model=str(self.model), instance_dir=str(self.concept_dir(concept)), resolution=p.resolution,
                      method=method, blocks=blocks,
                      trigger=p.identity_trigger if concept == "identity" else p.style_trigger,
                      class_word=p.class_word if concept == "identity" else "",
                      checkpoint_every=0, seed=0)
        if p.reg_count and concept == "identity":
            values["reg_dir"] = str(self.out / "data" / "reg")
        values.update(p.train)
        identity = {k: v for k, v in values.items() if k not in ("output_dir", "resume", "stop_after")}
        identity["data"] = fingerprint(self.concept_dir(concept))
        identity["model_weights"] = self.model_fingerprint
        if "reg_dir" in values:
            identity["reg_data"] = fingerprint(Path(values["reg_dir"]))
        values["output_dir"] = str(self.out / "adapters" / f"{key}-{config_hash(identity)}")
        return TrainConfig(**values)

    def adapter_files(self) -> dict[str, Path]:
        return {k: Path(self.train_config(k).output_dir) / "adapter.safetensors" for k in self.needed_adapters()}

    def train_all(self, log=print) -> dict[str, Path]:
        """Train every adapter the grids need; ones whose config and data are unchanged are reused."""
        keys = self.needed_adapters()
        configs = {key: self.train_config(key) for key in keys}
        todo = []
        for i, key in enumerate(keys, 1):
            final = Path(configs[key].output_dir) / "adapter.safetensors"
            if final.exists():
                log(f"[{i}/{len(keys)}] {key}: reusing {final.parent.name} (same config and data)")
            else:
                todo.append(key)
        train_adapters({key: configs[key] for key in todo}, self.profile.train_workers, log)
        return {key: Path(config.output_dir) / "adapter.safetensors" for key, config in configs.items()}

    # ----- grids -------------------------------------------------------------------------------------------------

    def cells(self) -> dict[str, dict[str, dict]]:
        """Every grid's columns: references first, then the paper's cells."""
        return {g: {**references(GRID_METHOD[g]), **GRIDS[g]} for g in self.profile.grids}

    def run_grids(self, log=print) -> Path:
        """Generate every cell (same prompts and seeds everywhere, batched), score it, write the results table."""
        from .compose import load_adapters, set_block_weights
        from .generate import generate
        from .pipeline import load_pipeline

        p = self.profile
        files = self.adapter_files()
        missing = [k for k, f in files.items() if not f.exists()]
        if missing:
            raise FileNotFoundError(f"adapters not trained yet: {missing}; run the training step first")
        pipe = load_pipeline(self.model)
        load_adapters(pipe, files)
        probe = self._probe()
        hashes = {k: file_hash(f) for k, f in files.items()}
        rows = []
        unique: dict[str, tuple[str, str]] = {}
        for grid, cells in self.cells().items():
            for label, adapters in cells.items():
                key = cell_key(p, self.model_fingerprint, adapters, hashes)
                folder = self.out / "cells" / key
                if not (folder / "scores.json").exists():
                    set_block_weights(pipe, adapters)
                    images = generate(pipe, p.prompts, p.seeds, p.sample_steps, p.guidance_scale, p.batch_size, p.resolution)
                    self._save_cell(folder, images, adapters, probe)
                    log(f"{grid} / {label}: generated {len(images)} images")
                else:
                    log(f"{grid} / {label}: reusing cell {key}")
                unique[key] = (grid, label)
                scores = json.loads((folder / "scores.json").read_text())
                summary = summarize(scores)
                rows.append({"grid": grid, "cell": label, "key": key,
                             **{f"{m}": summary[m].mean for m in METRICS}, **{f"{m}_ci": summary[m].ci for m in METRICS},
                             **{f"{m}_n": summary[m].n for m in METRICS}})
        return self._write_results(rows)

    def _probe(self):
        if self.profile.metrics != "probe":
            return None
        from .probes import load_probe
        from .toy import PROBE_PATH

        return load_probe(PROBE_PATH)

    def _save_cell(self, folder: Path, images: list[Image.Image], adapters: dict, probe) -> None:
        p = self.profile
        folder.mkdir(parents=True, exist_ok=True)
        sheet = np.stack([np.asarray(img) for img in images])
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=sheet)
        with atomic_path(folder / "images.npz") as tmp:
            tmp.write_bytes(buffer.getvalue())
        prompts = [prompt for prompt in p.prompts for _ in p.seeds]
        scores = image_scores(probe, images, prompts) if probe is not None else [{} for _ in images]
        write_json(folder / "cell.json", {"adapters": {k: str(v) for k, v in adapters.items()}, "prompts": p.prompts,
                                          "seeds": p.seeds, "steps": p.sample_steps, "cfg": p.guidance_scale, "bwl_version": __version__})
        write_json(folder / "scores.json", scores)  # written last: its presence marks a complete cell

    def cell_images(self, key: str) -> list[Image.Image]:
        with np.load(self.out / "cells" / key / "images.npz") as data:
            return [Image.fromarray(a) for a in data["images"]]

    # ----- results and figures -----------------------------------------------------------------------------------

    def _write_results(self, rows: list[dict]) -> Path:
        figures = self.profile.path(self.profile.figures_dir)
        with atomic_path(figures / "results.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        write_text(figures / "results.md", results_markdown(rows))
        grids = {r["grid"] for r in rows}
        if all(int(r["identity_n"]) for r in rows) and {"fig2", "fig3", "fig4a", "fig4b"} <= grids:
            from .findings import findings_markdown

            write_text(figures / "findings.md", findings_markdown(rows))
        write_json(figures / "results.json", {"profile": dataclasses.asdict(self.profile), "rows": rows, "bwl_version": __version__})
        return figures / "results.csv"

    def results(self) -> list[dict]:
        figures = self.profile.path(self.profile.figures_dir)
        with open(figures / "results.csv", newline="") as f:
            return list(csv.DictReader(f))

    def make_figures(self) -> list[Path]:
        """One labeled grid per paper figure: columns are cells, rows are (prompt, seed) pairs."""
        from .figures import labeled_grid

        p = self.profile
        figures = p.path(p.figures_dir)
        rows_by_grid: dict[str, list[dict]] = {}
        for row in self.results():
            rows_by_grid.setdefault(row["grid"], []).append(row)
        written = []
        trigger_prompts = [i for i, prompt in enumerate(p.prompts) if p.identity_trigger in prompt] or [0]
        picks = [(i, s) for s in range(len(p.seeds)) for i in trigger_prompts][: p.figure_rows]
        for grid, rows in rows_by_grid.items():
            columns = [self.cell_images(r["key"]) for r in rows]
            image_rows = [[col[i * len(p.seeds) + s] for col in columns] for i, s in picks]
            labels = [f"{p.prompts[i].split(',')[-1].strip()} #{p.seeds[s]}" for i, s in picks]
            grid_image = labeled_grid(image_rows, labels, [r["cell"] for r in rows], scale=max(1, 96 // p.resolution))
            with atomic_path(figures / f"{grid}.png") as tmp:
                grid_image.save(tmp, format="PNG")
            written.append(figures / f"{grid}.png")
        return written


def results_markdown(rows: list[dict], digits: int = 2) -> str:
    """The results as a markdown table: mean ± 95 % CI per metric."""
    header = "| grid | cell | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (2 + len(METRICS))]
    for r in rows:
        values = [str(Estimate(float(r[m]), float(r[f"{m}_ci"]), int(r[f"{m}_n"]))) if int(r[f"{m}_n"]) else "–" for m in METRICS]
        lines.append(f"| {r['grid']} | {r['cell']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def caption_summary(study: Study, top: int = 12) -> str:
    """Per concept: image count, one example caption and the most frequent tags (kohya's ss_tag_frequency)."""
    from .captions import tag_frequency

    lines = []
    for concept in ("identity", "style"):
        folder = study.concept_dir(concept)
        captions = sorted(folder.glob("*.txt"))
        example = captions[0].read_text(encoding="utf-8").strip() if captions else "(none)"
        frequency = tag_frequency([folder])[folder.name]
        tags = ", ".join(f"{t} ({n})" for t, n in list(frequency.items())[:top])
        lines += [f"{concept}: {len(captions)} captioned images", f"  example: {example}", f"  tags: {tags}"]
    return "\n".join(lines)


def adapter_table(study: Study) -> str:
    """Every trained adapter: method, blocks, and adapter parameters per paper block."""
    from .blocks import PAPER_BLOCKS
    from .kohya import inspect_adapter

    header = f"{'adapter':<20} {'method':<6} {'blocks':<7} " + " ".join(f"{b:>6}" for b in PAPER_BLOCKS) + f" {'total':>8}"
    lines = [header]
    for key, path in study.adapter_files().items():
        report = inspect_adapter(path)
        counts = " ".join(f"{report.parameters[b]:>6}" for b in PAPER_BLOCKS)
        lines.append(f"{key:<20} {report.method:<6} {report.blocks:<7} {counts} {sum(report.parameters.values()):>8}")
    return "\n".join(lines)


def plot_losses(study: Study):
    """All adapters' loss curves on one axes."""
    import matplotlib.pyplot as plt

    from .figures import plot_loss_curve

    _, ax = plt.subplots(figsize=(7, 3.5))
    for key, path in study.adapter_files().items():
        plot_loss_curve(path.parent / "loss.csv", ax=ax, label=key)
    ax.legend(fontsize=7, ncol=2)
    return ax


def sweep_specs(pairs: bool = True) -> list[str]:
    """Every single paper block, then every pair of them (the paper's open question 1)."""
    from itertools import combinations

    from .blocks import PAPER_BLOCKS

    singles = list(PAPER_BLOCKS)
    return singles + ([f"{a}+{b}" for a, b in combinations(PAPER_BLOCKS, 2)] if pairs else [])


def run_sweep(study: Study, log=print) -> Path:
    """Style LoCon trained on each block and block pair, each combined with the full-block identity; scored.

    Writes ``sweep.csv`` (identity and style fidelity with CIs per block spec) to the figures folder.
    """
    import dataclasses as dc

    from .compose import load_adapters, set_block_weights
    from .generate import generate
    from .pipeline import load_pipeline

    p = study.profile
    sweep_profile = dc.replace(p, seeds=list(p.sweep_seeds))
    identity_key = "id_locon_all"
    keys = [identity_key] + [f"style_locon_{spec}" for spec in sweep_specs(p.sweep_pairs)]
    configs = {key: study.train_config(key) for key in keys}
    files = {key: Path(config.output_dir) / "adapter.safetensors" for key, config in configs.items()}
    todo = {key: config for key, config in configs.items() if not files[key].exists()}
    log(f"{len(keys) - len(todo)} of {len(keys)} adapters reused, {len(todo)} to train")
    train_adapters(todo, p.train_workers, log)
    pipe = load_pipeline(study.model)
    probe = study._probe()
    hashes = {k: file_hash(f) for k, f in files.items()}
    rows = []
    for key in keys[1:]:
        adapters = {identity_key: 1.0, key: 1.0}
        cell = cell_key(sweep_profile, study.model_fingerprint, adapters, hashes)
        folder = study.out / "cells" / cell
        if not (folder / "scores.json").exists():
            load_adapters(pipe, {k: files[k] for k in adapters})
            set_block_weights(pipe, adapters)
            prompts = [q for q in p.prompts if p.style_trigger in q]
            images = generate(pipe, prompts, sweep_profile.seeds, p.sample_steps, p.guidance_scale, p.batch_size, p.resolution)
            Study(dc.replace(sweep_profile, prompts=prompts))._save_cell(folder, images, adapters, probe)
            pipe.delete_adapters([key])
        summary = summarize(json.loads((folder / "scores.json").read_text()))
        rows.append({"blocks": adapter_parts(key)[2], **{m: summary[m].mean for m in ("identity", "style")},
                     **{f"{m}_ci": summary[m].ci for m in ("identity", "style")}})
        log(f"sweep {rows[-1]['blocks']}: identity {rows[-1]['identity']:.2f}, style {rows[-1]['style']:.2f}")
    out = p.path(p.figures_dir) / "sweep.csv"
    with atomic_path(out) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return out


def sweep_figure(csv_path: Path, out: Path) -> Path:
    """Two heatmaps (identity, style fidelity; diagonal = single block, off-diagonal = pair) and a Pareto plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .blocks import PAPER_BLOCKS

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    index = {b: i for i, b in enumerate(PAPER_BLOCKS)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, metric in zip(axes[:2], ("identity", "style")):
        grid = np.full((9, 9), np.nan)
        for r in rows:
            parts = r["blocks"].split("+")
            i, j = index[parts[0]], index[parts[-1]]
            grid[i, j] = grid[j, i] = float(r[metric])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(9), PAPER_BLOCKS, rotation=45)
        ax.set_yticks(range(9), PAPER_BLOCKS)
        ax.set_title(f"{metric} fidelity (full ID + style on block / pair)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    ax = axes[2]
    xs, ys = [float(r["identity"]) for r in rows], [float(r["style"]) for r in rows]
    ax.scatter(xs, ys, s=14, color="gray")
    front = [r for r in rows if not any(float(o["identity"]) >= float(r["identity"]) and float(o["style"]) >= float(r["style"])
                                        and (o["identity"], o["style"]) != (r["identity"], r["style"]) for o in rows)]
    for r in front:
        ax.annotate(r["blocks"], (float(r["identity"]), float(r["style"])), fontsize=7)
    ax.scatter([float(r["identity"]) for r in front], [float(r["style"]) for r in front], color="crimson", s=20, label="Pareto front")
    ax.set_xlabel("identity fidelity")
    ax.set_ylabel("style fidelity")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
