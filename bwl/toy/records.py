"""The shipped assets' records as one table: what each file in ``data/`` is, the command that made it, how long that
took and what it measured, read from the records each command wrote beside its output (``pretrain.json``,
``training.json``, the probes' ``report`` metadata). ``python -m bwl assets`` writes it to ``figures/assets.md``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

from bwl.toy.assets import DATA, INSTRUMENTS, TOY_MODEL, TOY_SDXL_MODEL
from bwl.toy.encoder import TOY_CLIP


def size_mb(path: Path) -> str:
    """The bytes a file or folder adds to the repository: a linked folder (toy-sdxl's shared VAE) counts nothing."""
    files = [path] if path.is_file() else [Path(root) / name for root, _, names in os.walk(path) for name in names]
    return f"{sum(f.stat().st_size for f in files if not f.is_symlink()) / 2**20:.1f} MB"


def _model_row(model: Path, data: Path) -> str:
    pretrain = json.loads((model / "pretrain.json").read_text())
    sessions = ", ".join(f"{s['minutes']['total']} min to step {s['config']['unet_steps']}"
                         for s in pretrain["sessions"])
    vae = model / "vae"
    shared = f"; its VAE is `{vae.resolve().relative_to(data.parent.resolve())}`" if vae.is_symlink() else ""
    return (f"| `{model.relative_to(data.parent)}` | {size_mb(model)} | `{pretrain['command']}`{shared} | "
            f"{pretrain['minutes']} min over {len(pretrain['sessions'])} recorded "
            f"session{'s' if len(pretrain['sessions']) > 1 else ''} ({sessions}) | "
            "the quality gates (the toy world page) |")


def probe_report(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["report"])


def _lowest(accuracy: dict[str, float]) -> str:
    attribute = min(accuracy, key=accuracy.get)
    return "every attribute 100%" if accuracy[attribute] == 1 else f"≥ {accuracy[attribute]:.1%} (lowest: {attribute})"


def assets_markdown(data: Path = DATA) -> str:
    clip = json.loads((TOY_CLIP / "training.json").read_text())
    models = [_model_row(model, data) for model in (TOY_MODEL, TOY_SDXL_MODEL) if (model / "pretrain.json").exists()]
    lines = ["| asset | size | made by | time recorded (2 CPU cores) | what it measured |", "|---|---|---|---|---|",
             *models,
             f"| `{TOY_CLIP.relative_to(data.parent)}` | {size_mb(TOY_CLIP)} | `{clip['command']}` | "
             f"{clip['minutes']} min | top-1 caption retrieval on seen concepts "
             f"{clip['retrieval_top1_fresh_seen']:.1%} |"]
    for instrument in INSTRUMENTS:
        report = probe_report(instrument.path)
        lines.append(f"| `{instrument.path.relative_to(data.parent)}` | {size_mb(instrument.path)} | `python -m bwl "
                     f"probes` ({report['architecture']}, seed {report['seed']}, {report['steps']} steps on a pool of "
                     f"{report['pool']:,} renders) | {report['minutes']} min, plus {report['pool_minutes']} min for "
                     f"the shared pool | fresh renders {_lowest(report['accuracy_fresh_renders'])}; through the VAE "
                     f"{_lowest(report['accuracy_through_vae'])} |")
    return "\n".join(lines) + "\n"
