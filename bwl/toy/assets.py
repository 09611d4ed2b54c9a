"""The toy world's shipped assets and datasets: the micro SD in ``data/toy-sd``, the probes in ``data/`` (the first,
``toy-probe.safetensors``, is also the toy tagger), and the identity/style image folders written from the world's
held-out concepts (:mod:`bwl.toy.concepts`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from bwl.core.atomic import atomic_path, write_text
from bwl.sd.pipeline import load_pipeline
from bwl.toy.concepts import DEFAULT_PAIR, ConceptPair
from bwl.toy.pretrain import toy_vae
from bwl.toy.probe_training import accuracy, build_pool, concept_accuracy, train_probe
from bwl.toy.probes import save_probe
from bwl.toy.world import IDENTITY_TRIGGER, REPLICATE_SHAPES, REPLICATE_STYLES, STYLE_TRIGGER, render
from bwl.train.checkpoint import latest

DATA = Path(__file__).resolve().parents[2] / "data"
TOY_MODEL = DATA / "toy-sd"
TOY_SDXL_MODEL = DATA / "toy-sdxl"  # the second architecture: python -m bwl pretrain --architecture sdxl
PROBE_PATH = DATA / "toy-probe.safetensors"


@dataclass(frozen=True)
class Instrument:
    """One independently trained probe: its file, architecture and training seed."""

    name: str
    path: Path
    architecture: str
    seed: int


INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument("probe", PROBE_PATH, "cnn", 0),
    Instrument("probe-resnet", DATA / "toy-probe-resnet.safetensors", "resnet", 1),
    Instrument("probe-patch", DATA / "toy-probe-patch.safetensors", "patch", 2),
)
"""The toy study's probes; each metric is their mean, with their spread beside it."""


def _concept_set(concept: str, pair: ConceptPair, count: int) -> tuple[list, str]:
    if concept not in ("identity", "style"):
        raise ValueError(f"unknown toy concept {concept!r}; valid: identity, style")
    if concept == "identity":
        return pair.identity.images(count), IDENTITY_TRIGGER
    return pair.style.images(count), STYLE_TRIGGER


def write_concept(folder: str | Path, concept: str, count: int = 20, pair: ConceptPair = DEFAULT_PAIR) -> Path:
    """Render the pair's ``identity`` or ``style`` set (20 images, as the paper's datasets) into ``folder``.

    Images only: captions come from the data-prep step (tagger + manual correction), as in the paper.
    Existing images are kept, so the call is idempotent.
    """
    images, _ = _concept_set(concept, pair, count)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (character, seed) in enumerate(images):
        path = folder / f"{concept}_{i:02d}.png"
        if not path.exists():
            with atomic_path(path) as tmp:
                render(character, seed).save(tmp, format="PNG")
    return folder


def write_ground_truth_captions(folder: str | Path, concept: str, count: int = 20,
                                pair: ConceptPair = DEFAULT_PAIR) -> Path:
    """Captions from the world's exact labels (what a perfect tagger plus manual correction gives)."""
    images, trigger = _concept_set(concept, pair, count)
    for i, (character, _) in enumerate(images):
        write_text(Path(folder) / f"{concept}_{i:02d}.txt", ", ".join([trigger] + character.tags()) + "\n")
    return Path(folder)


def toy_vae_weights(model: str | Path = TOY_MODEL, pretrain_dir: str | Path = "runs/pretrain"):
    """The toy VAE: from the shipped model, else from pretraining's stage-1 checkpoint (stage 2 never changes it)."""
    if Path(model, "model_index.json").exists():
        return load_pipeline(model).vae
    found = latest(Path(pretrain_dir) / "vae")
    if not found:
        return None
    vae = toy_vae()
    vae.load_state_dict(
        {k[len("model.vae.") :]: v for k, v in load_file(str(found[-1])).items() if k.startswith("model.vae.")}
    )
    return vae.eval().requires_grad_(False)


def train_and_save_probes(steps: int = 1200, pool_size: int = 40960, model: str | Path = TOY_MODEL,
                          only: tuple[str, ...] = ()) -> dict[str, dict]:
    """Train every instrument (or those named in ``only``) on one shared pool of renders, half through the toy VAE,
    and save each with its accuracy on fresh renders, through the VAE, and on each replication concept."""
    vae = toy_vae_weights(model)
    started = time.time()
    pool = build_pool(pool_size, seed=0, vae=vae)
    pool_minutes = round((time.time() - started) / 60, 1)
    reports = {}
    for instrument in INSTRUMENTS:
        if only and instrument.name not in only:
            continue
        started = time.time()
        probe = train_probe(pool, instrument.architecture, steps=steps, seed=instrument.seed)
        new = {"shape": REPLICATE_SHAPES, "style": REPLICATE_STYLES}
        reports[instrument.name] = report = {
            "architecture": instrument.architecture, "seed": instrument.seed, "steps": steps, "pool": pool_size,
            "minutes": round((time.time() - started) / 60, 1), "pool_minutes": pool_minutes,
            "accuracy_fresh_renders": accuracy(probe),
            "accuracy_through_vae": accuracy(probe, vae=vae) if vae is not None else None,
            "new_concepts_fresh": concept_accuracy(probe, new),
            "new_concepts_through_vae": concept_accuracy(probe, new, vae=vae) if vae is not None else None,
            "command": "python -m bwl probes",
        }
        save_probe(probe, instrument.path, report)
    return reports
