"""The toy world's shipped assets and datasets: the micro SD in ``data/toy-sd``, the probe in
``data/toy-probe.safetensors``, and the identity/style image folders written from the world's held-out concepts."""

from __future__ import annotations

import time
from pathlib import Path

from safetensors.torch import load_file

from bwl.core.atomic import atomic_path, write_text
from bwl.sd.pipeline import load_pipeline
from bwl.toy.pretrain import toy_vae
from bwl.toy.probes import accuracy, save_probe, train_probe
from bwl.toy.world import IDENTITY_TRIGGER, STYLE_TRIGGER, identity_set, render, style_set
from bwl.train.checkpoint import latest

DATA = Path(__file__).resolve().parents[2] / "data"
TOY_MODEL = DATA / "toy-sd"
PROBE_PATH = DATA / "toy-probe.safetensors"


def write_concept(folder: str | Path, concept: str, count: int = 20) -> Path:
    """Render the held-out ``identity`` or ``style`` set (20 images, as the paper's datasets) into ``folder``.

    Images only: captions come from the data-prep step (tagger + manual correction), as in the paper.
    Existing images are kept, so the call is idempotent.
    """
    sets = {"identity": identity_set, "style": style_set}
    if concept not in sets:
        raise ValueError(f"unknown toy concept {concept!r}; valid: identity, style")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (character, seed) in enumerate(sets[concept](count)):
        path = folder / f"{concept}_{i:02d}.png"
        if not path.exists():
            with atomic_path(path) as tmp:
                render(character, seed).save(tmp, format="PNG")
    return folder


def write_ground_truth_captions(folder: str | Path, concept: str, count: int = 20) -> Path:
    """Captions from the world's exact labels (what a perfect tagger plus manual correction gives)."""
    sets = {"identity": (identity_set, IDENTITY_TRIGGER), "style": (style_set, STYLE_TRIGGER)}
    make, trigger = sets[concept]
    for i, (character, _) in enumerate(make(count)):
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


def train_and_save_probe(path: str | Path = PROBE_PATH, steps: int = 600, model: str | Path = TOY_MODEL) -> dict:
    """Train the probe (half its batches through the toy VAE) and save it with its accuracy."""
    vae = toy_vae_weights(model)
    started = time.time()
    probe = train_probe(steps=steps, vae=vae)
    report = {
        "steps": steps,
        "minutes": round((time.time() - started) / 60, 1),
        "accuracy_fresh_renders": accuracy(probe),
        "accuracy_through_vae": accuracy(probe, vae=vae) if vae is not None else None,
        "command": "python -m bwl probe",
    }
    save_probe(probe, path, report)
    return report
